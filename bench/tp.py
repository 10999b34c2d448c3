"""Tensor-parallel decode: one device vs a 2-device group on loopback and through a delayed link.

    python bench/tp.py [--model PATH | --synthetic llama-0.8b] [--backend torch] [--wires f32,bf16,int8]
                       [--tokens 32] [--rounds 1] [--delays-ms 1,5] [--smoke] [--insecure]
                       [--prompt story] [--llama-cpp]

Each configuration runs in its own process (so peak RSS is per configuration), the group's
worker in another (`tpi join`, one thread). The delayed links put tests/netproxy.py's
DelayProxy, in a process of its own, between the worker and both master ports (control and
data). Every group row runs once per wire dtype of the partial sums (--wires). With --rounds R
the whole list of configurations runs R times in turn, and each row reports the median over
rounds of its ms/token and of its ratio to the best single device of the same round.

The allreduce's floor is hops x one-way latency x 2 allreduces x layers per token (1 hop for two
ranks on the f32 wire, which swap partials; 2 for the star's round trip); the table shows it next
to what was measured. --synthetic llama-0.8b is issue 18's 0.8B Llama-shaped Q4_0 target (random
weights, bench/synthetic.py); --llama-cpp adds llama-cpp-python's decode and a tok/s ratio to it
(bench/tp_paired.py measures that target with every engine alive, in turns).

--speculation: issue 18's speculative-decoding rows instead: one device and the 2-device group
through the 1 ms proxy, each generating greedily on a prompt-grounded edit (bench/spec_prompts.py:
rewrite a ~300-token code file with one change) and on an open-ended story, with --speculate off
and auto in turn (same process, same group, interleaved --rounds times); tok/s ratios per pair.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import median, peak_rss_bytes, print_machine, print_table, ratio, run_proxy, smoke_model  # noqa: E402

from tpi.transport.keeper import free_port_pair  # noqa: E402

PROMPTS = {
    "tp": ("Tensor parallelism splits every layer of a language model across several devices, "
           "so that each one computes a share of the heads and of the MLP. Explain how"),
    # issue 18's open-ended task
    "story": ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
              "Once upon a time, on a rocky island far from the coast,"),
}


def _zmq_echo(ports) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    ports.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def loopback_rtt_s(rounds: int = 300, size: int = 4096) -> float:
    """Median pyzmq round trip of a small message to another process on loopback (the star's floor;
    a plain socket round trip within one process is ~10x shorter and no floor of anything here)."""
    import multiprocessing as mp

    import zmq

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_zmq_echo, args=(ports,), daemon=True)
    server.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"tcp://127.0.0.1:{ports.get(timeout=60)}")
        msg, times = b"x" * size, []
        for _ in range(rounds):
            t = time.perf_counter()
            sock.send(msg)
            sock.recv()
            times.append(time.perf_counter() - t)
    finally:
        sock.close()
        server.kill()
    return median(times[rounds // 10:])


# ---- one configuration (child process) ----------------------------------------------------------

def measure(engine, tokens: int, prompt: str) -> dict:
    """Prefill the prompt, then time `tokens` greedy decode steps one by one."""
    import numpy as np

    ids = engine.tokenizer.encode(PROMPTS[prompt], add_bos=True, special=True)
    logits = engine.forward(ids, 0)  # warm-up: first-touch allocations, kernel init
    engine.forward([int(np.argmax(logits[-1]))], len(ids))
    engine.reset()
    comm_stats = engine.comm.stats  # every Communicator keeps CommStats
    t = time.perf_counter()
    logits = engine.forward(ids, 0)
    prefill_s = time.perf_counter() - t
    ar0, bytes0 = engine.model.stats.allreduce_s, _comm_bytes(comm_stats)
    per_token = []
    pos = len(ids)
    for _ in range(tokens):
        tok = int(np.argmax(logits[-1]))
        t = time.perf_counter()
        logits = engine.forward([tok], pos)
        per_token.append(time.perf_counter() - t)
        pos += 1
    return {"prompt_tokens": len(ids), "prefill_s": prefill_s, "token_s": median(per_token),
            "tokens": tokens, "allreduce_s": engine.model.stats.allreduce_s - ar0,
            "bytes": _comm_bytes(comm_stats) - bytes0, "layers": engine.cfg.n_layers}


def measure_speculation(engine, tokens: int, rounds: int) -> dict:
    """Greedy generation on each prompt with speculation off and auto, interleaved: per (prompt, mode)
    the decode tok/s of every round, tokens per forward, acceptance, and whether the tokens agreed."""
    from spec_prompts import EDIT_REQUEST, STORY_REQUEST, chat_ids

    from tpi.master.sampler import SamplingParams
    from tpi.master.speculation import SpeculationOptions, build_speculator

    out = {}
    for name, request in (("edit", EDIT_REQUEST), ("story", STORY_REQUEST)):
        ids = chat_ids(engine.tokenizer, request)[:engine.context - tokens - 1]  # clipped only for --smoke's byte model
        runs: dict[str, list[dict]] = {"off": [], "auto": []}
        for _ in range(rounds):
            for mode in ("off", "auto"):
                engine.speculator = build_speculator(SpeculationOptions(mode), engine)
                engine.reset()
                gen = engine.generate(ids, SamplingParams(temperature=0.0), tokens, ignore_eos=True)
                runs[mode].append({"tok_s": gen.stats()["decode_tok_s"], "tokens": gen.tokens, **gen.speculation})
        engine.speculator = None
        out[name] = {"prompt_tokens": len(ids), "same_tokens": all(
            a["tokens"] == b["tokens"] for a, b in zip(runs["off"], runs["auto"])),
            **{mode: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for mode, rs in runs.items()}}
    return out


def _comm_bytes(stats) -> int:
    return stats.bytes_sent + stats.bytes_received


def measure_llama_cpp(model: str, threads: int, tokens: int, prompt: str) -> dict:
    """llama-cpp-python's own decode of the same prompt (the anchor of issue 18's 0.8B target)."""
    from single_device import LlamaCppRunner
    from single_device import measure as measure_runner

    from tpi.formats.gguf import GGUFSource

    source = GGUFSource(Path(model))
    ids = source.tokenizer().encode(PROMPTS[prompt], add_bos=True, special=True)
    runner = LlamaCppRunner(model, threads, len(ids) + tokens + 16)
    runner.step(runner.prefill(ids), len(ids))  # warm-up, as measure() does
    _, decode_tps, prefill_s = measure_runner(runner, ids, tokens)
    return {"prompt_tokens": len(ids), "prefill_s": prefill_s, "token_s": 1.0 / decode_tps, "tokens": tokens,
            "allreduce_s": 0.0, "bytes": 0, "layers": source.config.n_layers,
            "rss": [peak_rss_bytes()]}


def run_config(cfg: dict) -> dict:
    from tpi.master import GroupOptions, start_group

    if cfg["kind"] == "llama.cpp":
        return measure_llama_cpp(cfg["model"], cfg["threads"], cfg["tokens"], cfg["prompt"])
    tmp = Path(cfg["tmp"])
    common = dict(model=cfg["model"], config_dir=tmp / "config", cache_dir=tmp / "cache", insecure=cfg["insecure"],
                  threads=cfg["threads"], backend=cfg["backend"], worker_backend=cfg["backend"])
    if cfg["kind"] != "single":
        common["wire_dtype"] = cfg["wire"]
    helpers: list[subprocess.Popen] = []
    worker_pid = None
    try:
        if cfg["kind"] == "single":
            group = start_group(GroupOptions(**common))
        elif cfg["kind"] == "loopback":
            group = start_group(GroupOptions(**common, local_workers=1, host="127.0.0.1", ratios=(0.5, 0.5)))
            worker_pid = group.procs[0].pid
        else:  # delayed link: worker -> proxy (own process) -> master, for both ports
            group = _serve_through_proxy(cfg, common, tmp, helpers)
            worker_pid = helpers[-1].pid
        try:
            result = (measure_speculation(group.engine, cfg["tokens"], cfg["rounds"]) if cfg.get("speculation")
                      else measure(group.engine, cfg["tokens"], cfg["prompt"]))
            result["rss"] = [peak_rss_bytes()] + ([peak_rss_bytes(worker_pid)] if worker_pid else [])
        finally:
            group.close()
        if len(helpers) == 2:
            helpers[1].wait(timeout=30)  # the worker leaves once the master stops the group
    finally:
        for p in helpers:
            if p.poll() is None:
                p.kill()
                p.wait()
    return result


def _serve_through_proxy(cfg: dict, common: dict, tmp: Path, helpers: list):
    """Start the master, then (once it listens) the proxy and a `tpi join` routed through it."""
    import threading

    from tpi.master import GroupOptions, start_group
    from tpi.master.events import WaitingForDevices
    from tpi.transport.security import master_token

    port, proxy_port = free_port_pair(), free_port_pair()
    listening, box = threading.Event(), {}

    def say(event) -> None:
        if isinstance(event, WaitingForDevices):
            listening.set()

    def master() -> None:
        try:
            box["group"] = start_group(GroupOptions(**common, devices=2, host="127.0.0.1", port=port,
                                                    ratios=(0.5, 0.5), join_timeout_s=300), on_event=say)
        except Exception as e:  # re-raised on the calling thread
            box["error"] = e
        listening.set()

    thread = threading.Thread(target=master, daemon=True)
    thread.start()
    # The worker must not connect before the master listens: the proxy would close the connection
    # mid-handshake, which the worker reads as a failed CURVE handshake and gives up on.
    listening.wait(timeout=300)
    if "error" not in box:
        proxy = subprocess.Popen([sys.executable, __file__, "--proxy", str(proxy_port), str(port),
                                  str(cfg["delay_s"]), str(cfg.get("mbit") or 0)], stdout=subprocess.PIPE, text=True)
        helpers.append(proxy)
        assert proxy.stdout.readline().strip() == "ready", "the delay proxy did not start"
        cmd = [sys.executable, "-m", "tpi", "join", f"127.0.0.1:{proxy_port}", "--token", master_token(tmp / "config"),
               "--data-endpoint", f"127.0.0.1:{proxy_port + 1}", "--name", "proxied", "--threads", "1",
               "--backend", cfg["backend"],
               "--cache-dir", str(tmp / "worker-cache"), "--key-dir", str(tmp / "worker-keys")]
        if cfg.get("smoke"):  # the ratios are fixed, so the worker's profile is unused: skip measuring it
            (tmp / "no-profile.json").write_text("{}")
            cmd += ["--profile-file", str(tmp / "no-profile.json")]
        helpers.append(subprocess.Popen(cmd + (["--insecure"] if cfg["insecure"] else []), stdin=subprocess.DEVNULL))
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["group"]


# ---- orchestration --------------------------------------------------------------------------------

def configurations(args, cores: int) -> list[tuple[str, str, int, float, str, float]]:
    """(label, kind, threads, one-way delay s, wire, Mbit/s or 0) in run order; group rows once per wire."""
    wires = args.wires.split(",")
    delays = [float(d) / 1e3 for d in args.delays_ms.split(",") if d][: 1 if args.smoke else None]
    configs = [(f"llama.cpp, {cores} threads", "llama.cpp", cores, 0.0, "-", 0.0)] if args.llama_cpp else []
    configs += [] if args.smoke else [(f"1 device, {cores} threads", "single", cores, 0.0, "-", 0.0)]
    configs += [("1 device, 1 thread", "single", 1, 0.0, "-", 0.0)]
    # smoke: the proxied row covers the group path; plain loopback groups are what the tests start
    configs += [] if args.smoke else [(f"N=2 loopback, 1 thread each, {w}", "loopback", 1, 0.0, w, 0.0)
                                      for w in wires]
    configs += [(f"N=2 via proxy {d * 1e3:g} ms one-way, {w}", "proxy", 1, d, w, 0.0) for d in delays for w in wires]
    if args.mbit and delays and not args.smoke:  # a bandwidth-bound link: where a narrow wire pays
        configs += [(f"N=2 via proxy {delays[0] * 1e3:g} ms one-way, {args.mbit:g} Mbit, {w}", "proxy", 1,
                     delays[0], w, args.mbit) for w in wires]
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--synthetic", help="a random-weight shape of bench/synthetic.py instead, e.g. llama-0.8b")
    ap.add_argument("--backend", default="torch", help="kernel backend of every rank (tpi --backend)")
    ap.add_argument("--wires", default="f32,bf16,int8", help="wire dtypes of the group rows")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per configuration")
    ap.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, in turn")
    ap.add_argument("--delays-ms", default="1,5", help="one-way delays of the proxied links")
    ap.add_argument("--mbit", type=float, default=10.0,
                    help="also the first delay capped at this bandwidth each way (0: no such rows)")
    ap.add_argument("--prompt", choices=sorted(PROMPTS), default="tp", help="the prompt prefilled before decoding")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also llama-cpp-python's decode (all cores, same prompt ids): a tok/s ratio column")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, few tokens: checks the bench runs")
    ap.add_argument("--insecure", action="store_true", help="no CURVE encryption on the group links")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--speculation", action="store_true",
                    help="the speculative-decoding rows (edit and story prompts, --speculate off vs auto)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--proxy", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.proxy:
        run_proxy(int(args.proxy[0]), int(args.proxy[1]), float(args.proxy[2]), float(args.proxy[3]) or None)
        return
    if args.child:
        print("RESULT " + json.dumps(run_config(json.loads(args.child))), flush=True)
        return

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="tpi-bench-tp-") as tmp_dir:
        tmp = Path(tmp_dir)
        if args.synthetic:
            from synthetic import cached_model

            model = str(cached_model(args.synthetic, log=lambda m: print(m, file=sys.stderr)))
        else:
            model = args.model or (smoke_model(tmp) if args.smoke else None)
        tokens = 4 if args.smoke else args.tokens
        if args.speculation:
            speculation_rows(args, model, tmp, tokens)
            return
        rtt = loopback_rtt_s()
        configs = configurations(args, cores)
        results: list[list[dict]] = []  # per round, per configuration
        for round_ in range(args.rounds):
            row = []
            for i, (label, kind, threads, delay, wire, mbit) in enumerate(configs):
                cfg = {"kind": kind, "threads": threads, "delay_s": delay, "model": model, "tokens": tokens,
                       "insecure": args.insecure, "tmp": str(tmp / f"c{i}"), "smoke": args.smoke,
                       "backend": args.backend, "wire": wire, "mbit": mbit, "prompt": args.prompt}
                print(f"running (round {round_ + 1}/{args.rounds}): {label}", file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE,
                                     text=True, check=True, timeout=1800)
                line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
                row.append({"label": label, "kind": kind, "delay_s": delay, "wire": wire,
                            **json.loads(line[len("RESULT "):])})
            results.append(row)
    report(results, rtt, args, model)


def speculation_rows(args, model: str | None, tmp: Path, tokens: int) -> None:
    """Run and print the speculative-decoding rows (one child process per configuration)."""
    wire = args.wires.split(",")[0]
    delay = float(args.delays_ms.split(",")[0]) / 1e3
    configs = [("1 device, 1 thread", "single", 0.0), (f"N=2 via proxy {delay * 1e3:g} ms one-way, {wire}", "proxy", delay)]
    rows = []
    results = []
    for i, (label, kind, d) in enumerate(configs):
        cfg = {"kind": kind, "threads": 1, "delay_s": d, "model": model, "tokens": tokens, "insecure": args.insecure,
               "tmp": str(tmp / f"s{i}"), "smoke": args.smoke, "backend": args.backend, "wire": wire, "mbit": 0,
               "speculation": True, "rounds": args.rounds}
        print(f"running: {label}", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE,
                             text=True, check=True, timeout=7200)
        res = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
        results.append({"label": label, **res})
        for prompt in ("edit", "story"):
            r = res[prompt]
            off, auto = r["off"], r["auto"]
            ratio = median([a["tok_s"] / o["tok_s"] for a, o in zip(auto, off)])
            rows.append([label, prompt, median([o["tok_s"] for o in off]), median([a["tok_s"] for a in auto]),
                         f"{ratio:.2f}x", median([a["tokens_per_forward"] for a in auto]),
                         median([a["spec_acceptance"] for a in auto]), "yes" if r["same_tokens"] else "NO"])
    print_machine()
    name = Path(model).name if model else "SmolLM2-135M (embedded)"
    print_table(f"Speculative decoding, {name}, backend {args.backend}, greedy, {tokens} tokens, "
                f"median of {args.rounds} interleaved off/auto pairs",
                ["configuration", "prompt", "off tok/s", "auto tok/s", "auto / off", "tokens/forward",
                 "acceptance", "same tokens"], rows,
                notes=["edit: rewrite a ~300-token Python file with one function renamed (bench/spec_prompts.py); "
                       "story: an open-ended story prompt. auto = prompt lookup, k adapted to the measured acceptance.",
                       "Ratios pair each auto run with the off run just before it in the same process and group.",
                       "command: python bench/tp.py " + shlex.join(sys.argv[1:])])
    edit = next(r for r in results if r["label"].startswith("1 device"))["edit"]["auto"]
    speculation_ceiling(model, median([a["spec_acceptance_per_draft"] for a in edit]), args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def speculation_ceiling(model: str | None, accept: float, rounds: int) -> None:
    """What one device's kernels allow a verify pass: llama.cpp's own (k+1)-token step against its
    one-token step (1 thread, as the 1-device row), and the gain of k drafts at full and at the measured
    acceptance: E(k) / c(k+1), E(k) = 1 + a + ... + a^k tokens a forward."""
    from llama_rows import default_model, step_costs  # the bench's llama.cpp anchor

    from tpi.devices.speculation_cost import expected_tokens

    drafts = [1, 2, 4, 8]
    cost = step_costs(model or default_model(), 1, [1] + [k + 1 for k in drafts], rounds + 1, kinds=("chunk",))
    rows = []
    for k in drafts:
        c = cost["chunk", k + 1] / cost["chunk", 1]
        rows.append([k, f"{1e3 * cost['chunk', k + 1]:.1f}", f"{c:.2f}x", f"{(k + 1) / c:.2f}x",
                     f"{expected_tokens(accept, k) / c:.2f}x"])
    print_table(f"One device's ceiling: llama.cpp's own (k+1)-token step, 1 thread (one token: "
                f"{1e3 * cost['chunk', 1]:.1f} ms)",
                ["drafts k", "llama.cpp k+1 tokens: ms", "vs 1 token", "gain at full acceptance",
                 f"gain at the measured {accept:.2f}"], rows,
                notes=["a verify pass of k drafts yields at most k + 1 tokens for the cost of a (k+1)-token step;"
                       " no engine on these kernels speculates faster than the full-acceptance column on one device"])


def report(rounds: list[list[dict]], rtt: float, args, model: str | None) -> None:
    # Anchor: the faster single-device run of the same round (2 threads can lose badly to 1 on a busy 2-core machine).
    anchors = [min(r["token_s"] for r in row if r["kind"] == "single") for row in rounds]
    # issue 18's 0.8B target: tokens/s against llama.cpp's own decode in the same round
    cpp = [[r["token_s"] for r in row if r["kind"] == "llama.cpp"] for row in rounds]
    rows = []
    for i, r in enumerate(rounds[0]):
        runs = [row[i] for row in rounds]
        token_s = median([x["token_s"] for x in runs])
        vs = median([x["token_s"] / a for x, a in zip(runs, anchors)])
        vs_cpp = [f"{median([c[0] / x['token_s'] for x, c in zip(runs, cpp)]):.2f}x"] if cpp[0] else []
        layers, n = r["layers"], r["tokens"]
        group = r["kind"] not in ("single", "llama.cpp")
        one_way = r["delay_s"] + rtt / 2 if group else 0.0
        hops = 1 if r["wire"] == "f32" else 2  # two ranks on f32 swap partials; the star's round trip otherwise
        ideal = hops * one_way * 2 * layers  # 2 allreduces per layer
        rss = [f"{b / 2**20:.0f}" for b in r["rss"]]
        ar = median([x["allreduce_s"] for x in runs]) / n / layers * 1e3
        rows.append([r["label"], token_s * 1e3, f"{vs:.2f}x", *vs_cpp,
                     ar if group else "-",
                     ideal / layers * 1e3 if ideal else "-", ideal * 1e3 if ideal else "-",
                     r["bytes"] / n / 1024, " / ".join(rss)])
    print_machine()
    layers = rounds[0][0]["layers"]
    name = Path(model).name if model else "SmolLM2-135M (embedded)"
    print_table(
        f"Decode per token, {name}, backend {args.backend}, {rounds[0][0]['prompt_tokens']}-token prompt, "
        f"median of {rounds[0][0]['tokens']} tokens" + (f", median of {len(rounds)} rounds" if len(rounds) > 1 else ""),
        ["configuration", "ms/token", "vs best 1 device", *(["tok/s vs llama.cpp"] if cpp[0] else []), "allreduce ms/layer", "ideal ms/layer", "ideal ms/token",
         "KiB/token", "peak RSS MiB (rank 0 / 1)"],
        rows,
        notes=[f"ideal = allreduce floor: hops x one-way latency x 2 allreduces x {layers} layers, 1 hop with the f32 "
               "wire (the two ranks swap partials), 2 with bf16/int8 (the star's round trip); "
               f"loopback one-way latency taken as half the measured {rtt * 1e6:.0f} us pyzmq round trip between "
               "two processes.",
               "allreduce time is rank 0's wait inside allreduce (includes waiting for the slower rank's compute).",
               "KiB/token counts rank 0's sent + received data-channel bytes (step, partials, sums, logits); "
               "the wire (f32, bf16, int8) is that of the partial sums. A Mbit row caps each direction of each "
               "proxied connection at that rate (its ideal column counts latency only, not bytes).",
               f"{'CURVE off (--insecure)' if args.insecure else 'CURVE on'}. Shared, noisy machine: "
               "other jobs were running; compare ratios (each to the best single device of its own round).",
               "command: python bench/tp.py " + shlex.join(sys.argv[1:])])
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
