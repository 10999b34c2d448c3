"""Issue 18's 0.8B target: llama.cpp, one tpi device and 2-device loopback groups, decoding in turns.

    python bench/tp_paired.py [--synthetic llama-0.8b] [--wires f32,bf16,int8] [--blocks 12] [--block 8]
                              [--prompt story] [--insecure] [--threads 2] [--realtime]
                              [--variant f32:TPI_STAR_ONLY=1] [--smoke]

Every engine is started once, in its own process (a group: the master here, its worker in another,
one ggml thread each), prefills the prompt, and then waits. The engines then decode in turns, a
block of --block greedy tokens each, for --blocks rounds, each round in another order: machine
noise (other jobs on this shared 2-core machine) hits all of them alike, and every ratio is taken
between blocks of the same round, then the median over rounds. The anchor is llama-cpp-python's
own decode with --threads threads on the same prompt ids. bench/tp.py runs one configuration at a
time instead (and the delayed links).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import median, peak_rss_bytes, print_machine, print_table, smoke_model  # noqa: E402
from tp import PROMPTS  # noqa: E402


# ---- one engine (child process) --------------------------------------------------------------------

class TpiDecoder:
    """A tpi engine (one device or a loopback group) continuing one greedy sequence block by block."""

    def __init__(self, cfg: dict):
        from tpi.master import GroupOptions, start_group

        tmp = Path(cfg["tmp"])
        opts = dict(model=cfg["model"], config_dir=tmp / "config", cache_dir=tmp / "cache", insecure=cfg["insecure"],
                    threads=cfg["threads"], backend="ggml", worker_backend="ggml")
        if cfg["kind"] == "group":
            opts.update(wire_dtype=cfg["wire"], local_workers=1, host="127.0.0.1", ratios=(0.5, 0.5))
        self.group = start_group(GroupOptions(**opts))
        self.engine = self.group.engine
        self.worker_pid = self.group.procs[0].pid if cfg["kind"] == "group" else None
        ids = self.engine.tokenizer.encode(PROMPTS[cfg["prompt"]], add_bos=True, special=True)
        self.prompt_tokens = len(ids)
        self.engine.forward(ids, 0)  # warm-up: first-touch allocations, kernel init
        self.engine.reset()
        self.tok, self.pos = self._argmax(self.engine.forward(ids, 0)), len(ids)
        stats = self.engine.model.stats
        self.ar0, self.comm0 = stats.allreduce_s, self._comm_bytes()

    @staticmethod
    def _argmax(logits) -> int:
        return int(logits[-1].argmax())

    def _comm_bytes(self) -> int:
        s = getattr(self.engine.comm, "stats", None)
        return 0 if s is None else s.bytes_sent + s.bytes_received

    def block(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.tok = self._argmax(self.engine.forward([self.tok], self.pos))
            times.append(time.perf_counter() - t)
            self.pos += 1
        return times

    def close(self) -> dict:
        out = {"allreduce_s": self.engine.model.stats.allreduce_s - self.ar0, "bytes": self._comm_bytes() - self.comm0,
               "layers": self.engine.cfg.n_layers, "prompt_tokens": self.prompt_tokens,
               "rss": [peak_rss_bytes()] + ([peak_rss_bytes(self.worker_pid)] if self.worker_pid else [])}
        self.group.close()
        return out


class LlamaCppDecoder:
    """llama-cpp-python's decode of the same prompt ids (tpi's tokenizer of the same GGUF)."""

    def __init__(self, cfg: dict):
        from single_device import LlamaCppRunner

        from tpi.formats.gguf import GGUFSource

        source = GGUFSource(Path(cfg["model"]))
        ids = source.tokenizer().encode(PROMPTS[cfg["prompt"]], add_bos=True, special=True)
        self.layers, self.prompt_tokens = source.config.n_layers, len(ids)
        self.runner = LlamaCppRunner(cfg["model"], cfg["threads"], len(ids) + cfg["context_tokens"] + 16)
        self.runner.step(self.runner.prefill(ids), len(ids))  # warm-up
        self.tok, self.pos = self.runner.prefill(ids), len(ids)

    def block(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.tok = self.runner.step(self.tok, self.pos)
            times.append(time.perf_counter() - t)
            self.pos += 1
        return times

    def close(self) -> dict:
        return {"allreduce_s": 0.0, "bytes": 0, "layers": self.layers, "prompt_tokens": self.prompt_tokens,
                "rss": [peak_rss_bytes()]}


def serve(cfg: dict) -> None:
    """Child: start the engine, then answer `n` (decode n tokens) with their times, `end` with totals."""
    dec = LlamaCppDecoder(cfg) if cfg["kind"] == "llama.cpp" else TpiDecoder(cfg)
    print("OUT ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "end":
            print("OUT " + json.dumps(dec.close()), flush=True)
            return
        print("OUT " + json.dumps(dec.block(int(line))), flush=True)


# ---- orchestration --------------------------------------------------------------------------------

class Child:
    """One engine process, asked over its stdin to decode blocks."""

    def __init__(self, label: str, cfg: dict):
        self.label, self.cfg = label, cfg
        env = dict(os.environ, **cfg.get("env", {}))  # a variant's settings reach its master, which tells its workers (Assign)
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.times: list[list[float]] = []

    def ask(self, line: str):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def answer(self):
        for out in self.proc.stdout:
            if out.startswith("OUT "):
                return out[4:].strip() if out.startswith("OUT ready") else json.loads(out[4:])
        raise RuntimeError(f"{self.label}: the engine process ended early (exit {self.proc.wait()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file")
    ap.add_argument("--synthetic", default="llama-0.8b", help="random-weight shape of bench/synthetic.py (no --model)")
    ap.add_argument("--wires", default="f32,bf16,int8", help="wire dtypes of the group rows")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's and the 1-device row's")
    ap.add_argument("--blocks", type=int, default=12, help="rounds of blocks")
    ap.add_argument("--block", type=int, default=8, help="tokens per block")
    ap.add_argument("--prompt", choices=sorted(PROMPTS), default="story")
    ap.add_argument("--insecure", action="store_true", help="no CURVE on the group links (default: CURVE on)")
    ap.add_argument("--variant", action="append", default=[], metavar="WIRE:NAME=VALUE[;NAME=VALUE]",
                    help="also a group row with these environment variables (an A/B of a setting), e.g. "
                         "f32:TPI_STAR_ONLY=1 (two ranks through the star instead of the partial swap)")
    ap.add_argument("--no-single", action="store_true", help="leave out the tpi 1-device row")
    ap.add_argument("--realtime", action="store_true",
                    help="run every engine under SCHED_FIFO (as `chrt -f 1`): stands in for an idle machine when "
                         "other jobs share the cores (needs root or CAP_SYS_NICE; a note and no change otherwise)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 rounds of 2 tokens: checks the bench runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        serve(json.loads(args.child))
        return
    if args.realtime:
        try:  # inherited by every engine process and its threads
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except (AttributeError, OSError) as e:
            print(f"note: SCHED_FIFO refused ({e}); running at normal priority", file=sys.stderr)
    tmp_models = tempfile.TemporaryDirectory(prefix="tpi-bench-tp-paired-model-")
    if args.smoke:
        args.model, args.blocks, args.block, args.wires = smoke_model(Path(tmp_models.name)), 2, 2, "f32"
    if args.model is None:
        from synthetic import cached_model

        args.model = str(cached_model(args.synthetic, log=lambda m: print(m, file=sys.stderr)))
    total = args.blocks * args.block
    labels = [("llama.cpp", f"llama.cpp, {args.threads} threads", args.threads, "-", {})]
    labels += [] if args.no_single else [("single", f"tpi 1 device, {args.threads} threads", args.threads, "-", {})]
    labels += [("group", f"tpi N=2 loopback, 1 thread each, {w}", 1, w, {}) for w in args.wires.split(",") if w]
    for v in args.variant:
        wire, _, settings = v.partition(":")
        env = dict(kv.split("=", 1) for kv in settings.split(";") if kv)
        labels.append(("group", f"tpi N=2 loopback, 1 thread each, {wire}, {settings}", 1, wire, env))
    with tempfile.TemporaryDirectory(prefix="tpi-bench-tp-paired-") as tmp:
        children = []
        try:
            for i, (kind, label, threads, wire, env) in enumerate(labels):  # started one by one: no load races
                print(f"starting: {label}", file=sys.stderr, flush=True)
                child = Child(label, {"kind": kind, "threads": threads, "wire": wire, "model": args.model,
                                      "prompt": args.prompt, "insecure": args.insecure, "tmp": f"{tmp}/c{i}",
                                      "context_tokens": total, "env": env})
                child.answer()
                children.append(child)
            loads = [os.getloadavg()[0]]
            for b in range(args.blocks):
                k = b % len(children)
                for child in children[k:] + children[:k]:
                    child.times.append(child.ask(str(args.block)))
                loads.append(os.getloadavg()[0])
                print(f"round {b + 1}/{args.blocks}: " + ", ".join(f"{median(c.times[-1]) * 1e3:.1f}" for c in children)
                      + " ms/token", file=sys.stderr, flush=True)
            finals = [c.ask("end") for c in children]
        finally:
            for c in children:
                if c.proc.poll() is None:
                    c.proc.stdin.close()
                    try:
                        c.proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        c.proc.kill()
    tmp_models.cleanup()
    report(children, finals, args, loads)


def realtime() -> bool:
    """Whether this process (and so every engine it started) runs under a real-time policy."""
    try:
        return os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR)
    except (AttributeError, OSError):
        return False


def report(children: list[Child], finals: list[dict], args, loads: list[float]) -> None:
    anchor = [median(t) for t in children[0].times]  # llama.cpp's block medians
    rows = []
    for c, f in zip(children, finals):
        blocks = [median(t) for t in c.times]
        speed = median([a / x for a, x in zip(anchor, blocks)])  # tok/s ratio, paired per round
        n = sum(len(t) for t in c.times)
        group = c.cfg["kind"] == "group"
        rows.append([c.label, median([x for t in c.times for x in t]) * 1e3, f"{speed:.2f}x",
                     f"{min(a / x for a, x in zip(anchor, blocks)):.2f}-{max(a / x for a, x in zip(anchor, blocks)):.2f}",
                     f["allreduce_s"] / n / f["layers"] * 1e3 if group else "-", f["bytes"] / n / 1024 if group else "-",
                     " / ".join(f"{b / 2**20:.0f}" for b in f["rss"])])
    print_machine()
    print_table(
        f"Decode per token, {Path(args.model).name}, ggml, {finals[0]['prompt_tokens']}-token {args.prompt} prompt, "
        f"{args.blocks} rounds of {args.block} tokens",
        ["configuration", "ms/token", "tok/s vs llama.cpp", "range over rounds", "allreduce ms/layer", "KiB/token",
         "peak RSS MiB (rank 0 / 1)"],
        rows,
        notes=["tok/s vs llama.cpp = median over rounds of (llama.cpp's block median / this row's block median); "
               "ms/token = median over every token.",
               "allreduce ms/layer: rank 0's time inside its 2 allreduces per layer (includes waiting for the "
               "slower rank's compute); KiB/token: rank 0's data-channel bytes, sent + received.",
               f"{'CURVE off (--insecure)' if args.insecure else 'CURVE on (the default)'}; load average (1 min) "
               f"{min(loads):.1f}-{max(loads):.1f} during the rounds: a shared 2-core machine"
               + ("; every engine under SCHED_FIFO (--realtime or chrt), so the other jobs wait while it runs."
                  if realtime() else "; normal priority, so the other jobs' load lands on these numbers."),
               "command: python bench/tp_paired.py " + " ".join(sys.argv[1:])])


if __name__ == "__main__":
    main()
