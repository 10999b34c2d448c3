"""tpi's backends against llama-cpp-python on one device: same GGUF, threads and prompt, one run.

Every engine runs in its own process; rounds alternate between them so that machine noise hits
all alike; the table reports medians and each engine's ratio to llama.cpp (its default mode,
flash attention off; the flash-attention row is what tpi's ggml graphs compute bit for bit).

    python bench/single_device.py [--model PATH] [--threads 2] [--rounds 5] [--backends ggml,torch]
    python bench/single_device.py --synthetic-qwen2-1.5b     # random Qwen2.5-1.5B-shaped Q4_0 GGUF
    python bench/single_device.py --synthetic qwen2-1.5b --qtype Q4_K_M   # ... as llama.cpp's Q4_K_M mix
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, median, print_table  # noqa: E402


def prompt_ids(vocab: int, n: int) -> list[int]:
    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(100, min(vocab, 30000), n)]


class TpiRunner:
    def __init__(self, model: str, threads: int, context: int, backend: str = "ggml"):
        from tpi.master import EngineOptions, build_local_engine

        self.name = f"tpi {backend}"
        self.engine = build_local_engine(EngineOptions(model=model, context=context, threads=threads, backend=backend))

    def prefill(self, ids: list[int]) -> int:
        self.engine.reset()
        return int(self.engine.forward(ids, 0)[-1].argmax())

    def step(self, tok: int, pos: int) -> int:
        return int(self.engine.forward([tok], pos)[-1].argmax())


class LlamaCppRunner:
    def __init__(self, model: str, threads: int, context: int, flash_attn: bool = False):
        import llama_cpp

        self.name = "llama.cpp, flash attention" if flash_attn else "llama.cpp"
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=context, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=flash_attn, verbose=False)

    def _last_logits(self) -> np.ndarray:
        # without logits_all, llm.scores stays zero: read the context's last row directly
        import llama_cpp

        row = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),))

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return int(np.argmax(self._last_logits()))

    def step(self, tok: int, pos: int) -> int:
        self.llm.eval([tok])
        return int(np.argmax(self._last_logits()))


def measure(runner, ids: list[int], decode: int) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, TTFT s) of one round; greedy continuation."""
    t0 = time.perf_counter()
    tok = runner.prefill(ids)
    ttft = time.perf_counter() - t0
    times = []
    for i in range(decode):
        t = time.perf_counter()
        tok = runner.step(tok, len(ids) + i)
        times.append(time.perf_counter() - t)
    return len(ids) / ttft, 1.0 / median(times), ttft


def make_runner(kind: str, model: str, threads: int, context: int):
    """kind: "llama.cpp", "llama.cpp-fa" (flash attention), "tpi" (ggml) or "tpi:<backend>"."""
    if kind.startswith("llama.cpp"):
        return LlamaCppRunner(model, threads, context, flash_attn=kind.endswith("-fa"))
    return TpiRunner(model, threads, context, kind.partition(":")[2] or "ggml")


def serve_runner(kind: str, model: str, threads: int, context: int, conn) -> None:
    """Child process: one engine; measures a round whenever the parent asks (idle otherwise)."""
    runner = make_runner(kind, model, threads, context)
    conn.send((runner.name, runner.engine.cfg.vocab if hasattr(runner, "engine") else runner.llm.n_vocab()))
    while (req := conn.recv()) is not None:
        conn.send(measure(runner, *req))


class IsolatedRunner:
    """An engine in its own process: torch's and ggml's thread pools never share one (they starve
    each other on 2 cores: llama.cpp decode went 62 ms -> 0.4-5 s next to an idle tpi engine)."""

    def __init__(self, kind: str, model: str, threads: int, context: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=serve_runner, args=(kind, model, threads, context, child), daemon=True)
        self._proc.start()
        self.name, self.vocab = self._conn.recv()

    def measure(self, ids: list[int], decode: int) -> tuple[float, float, float]:
        self._conn.send((ids, decode))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(timeout=30)


def run(model: str, threads: int, rounds: int, prompt: int, decode: int,
        backends: tuple[str, ...] = ("ggml", "torch")) -> list[list]:
    context = prompt + decode + 8
    kinds = ["llama.cpp", "llama.cpp-fa"] + [f"tpi:{b}" for b in backends]
    runners = [IsolatedRunner(kind, model, threads, context) for kind in kinds]
    try:
        return _alternate(runners, prompt_ids(runners[0].vocab, prompt), rounds, decode)
    finally:
        for r in runners:
            r.close()


def _alternate(runners: list, ids: list[int], rounds: int, decode: int) -> list[list]:
    results = {r.name: [] for r in runners}
    for r in runners:  # warm-up: first-call allocations and page faults are not steady state
        r.measure(ids, 4)
    for i in range(rounds):  # each round in another order: no engine always runs right after the same one
        for r in runners[i % len(runners):] + runners[:i % len(runners)]:
            results[r.name].append(r.measure(ids, decode))
    rows = []
    anchor = results["llama.cpp"]
    for name, ms in results.items():
        med = [median([m[i] for m in ms]) for i in range(3)]
        # ratios paired per round (the same minute of machine load), then the median of them
        paired = [median([m[i] / a[i] for m, a in zip(ms, anchor)]) for i in range(3)]
        rows.append([name, med[0], f"{paired[0]:.2f}x", med[1], f"{paired[1]:.2f}x", 1000 * med[2],
                     f"{1 / paired[2]:.2f}x"])
    return rows


def add_model_args(ap: argparse.ArgumentParser, decode: int, decode_help: str) -> None:
    """The options every single-device benchmark shares: model, threads, prompt, decode, smoke."""
    ap.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=decode, help=decode_help)
    ap.add_argument("--synthetic", metavar="SHAPE", help="random model of bench/synthetic.py (e.g. qwen2-1.5b)")
    ap.add_argument("--synthetic-qwen2-1.5b", dest="synthetic", action="store_const", const="qwen2-1.5b",
                    help="the ~1.5B Qwen2-shaped Q4_0 GGUF (written once, ~1 GB, under --cache-dir)")
    ap.add_argument("--qtype", default="Q4_0", help="synthetic weights: Q4_0, Q4_1, Q8_0, or Q4_K_M / Q5_K_M / Q6_K "
                    "(llama.cpp's own mixes, re-quantized from a Q8_0 file)")
    ap.add_argument("--cache-dir", type=Path, help="where synthetic models are kept (default ~/.cache/tpi/bench)")
    ap.add_argument("--smoke", action="store_true", help="tiny run that only checks the script works")


def resolve_model(args: argparse.Namespace) -> None:
    """args.model from --synthetic (written once) or the embedded default."""
    if args.synthetic:
        from synthetic import cached_model

        args.model = str(cached_model(args.synthetic, qtype=args.qtype, out=args.cache_dir,
                                      log=lambda m: print(m, file=sys.stderr)))
    if args.model is None:
        from tpi.formats import default_model_path

        args.model = str(default_model_path())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, 64, "decoded tokens per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backends", default="ggml,torch", help="tpi backends to run, comma-separated (ggml,torch,numpy)")
    args = ap.parse_args()
    resolve_model(args)
    if args.smoke:
        args.rounds, args.prompt, args.decode = 1, 16, 4
    rows = run(args.model, args.threads, args.rounds, args.prompt, args.decode, tuple(args.backends.split(",")))
    print_table(
        f"Single device: {Path(args.model).name}, {args.threads} threads, prompt {args.prompt}, decode {args.decode}",
        COLUMNS, rows, notes=run_notes(args.rounds, "single_device.py"))


COLUMNS = ["engine", "prefill tok/s", "ratio", "decode tok/s", "ratio", "TTFT ms", "speedup"]  # of run()'s rows


def run_notes(rounds: int, script: str) -> list[str]:
    """What a table of run()'s rows needs said under it: the method, the machine, the command."""
    return [f"medians of {rounds} alternating rounds, each engine in its own process; "
            "ratio = engine / llama.cpp (flash attention off, llama-cpp-python's default), paired per round",
            f"machine: {machine_info()}", f"command: python bench/{script} " + " ".join(sys.argv[1:])]


if __name__ == "__main__":
    main()
