"""Where tpi's time goes on one device, by category, per decode step and for one prefill.

Beside it, llama-cpp-python runs the same GGUF, prompt and threads in its own process, so the table
shows tpi's time per token split into kernels and the rest, against llama.cpp's whole token.

    python bench/profile_decode.py [--model PATH] [--threads 2] [--prompt 128] [--decode 32] [--smoke]
    python bench/profile_decode.py --synthetic qwen2-1.5b --qtype Q4_K_M --backends ggml

torch: torch.profiler; categories come from the aten op names of each op's *self* CPU time (the
time inside that op, children excluded). "Between ops" is the profiled wall time less every op's
self time: Python (model code, numpy at the seam, the sampler's argmax) and the profiler's own
bookkeeping; the profiler adds a few µs per op, so both walls are shown.
ggml: each block is one ggml graph, so the categories are the time inside ggml's graph computation
per kind of block, the Python around each graph call (inputs, graph lookup), and what runs between
blocks (residual adds, embedding, argmax). Timers add ~1 µs per block.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, median, print_table, ratio, smoke_model  # noqa: E402
from single_device import IsolatedRunner, add_model_args, prompt_ids, resolve_model  # noqa: E402

# (category, aten op names); first match wins, the rest is "other torch ops".
CATEGORIES = (
    ("int4 matmul (q/k/v, o, gate/up, down)", ("aten::_weight_int4pack_mm_for_cpu",)),
    ("int8 matmul (output layer)", ("aten::_weight_int8pack_mm",)),
    ("dense matmul", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")),
    ("attention (bmm, softmax, SDPA)", ("aten::bmm", "aten::_softmax", "aten::softmax",
                                        "aten::_scaled_dot_product_flash_attention_for_cpu",
                                        "aten::_scaled_dot_product_attention_math",
                                        "aten::scaled_dot_product_attention")),
    ("RMSNorm (vector_norm, hypot, div)", ("aten::linalg_vector_norm", "aten::hypot", "aten::div")),
    ("RoPE, KV write, SiLU, residual, casts", ("aten::mul", "aten::copy_", "aten::_to_copy", "aten::silu",
                                               "aten::add_", "aten::add", "aten::view_as_real",
                                               "aten::view_as_complex")),
)
OTHER = "other torch ops (views, slices, allocations)"
BETWEEN = "between ops (Python, numpy, profiler)"


def categorise(events) -> tuple[dict[str, float], dict[str, int]]:
    """Self CPU seconds and calls per category from profiler key averages."""
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in events:
        name = next((c for c, ops in CATEGORIES if ev.key in ops), OTHER)
        seconds[name] += ev.self_cpu_time_total / 1e6
        calls[name] += ev.count
    return seconds, calls


def _profiled(fn, steps: int) -> tuple[float, dict[str, float], dict[str, int]]:
    """(profiled wall s per step, self s per category per step, calls per category per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for i in range(steps):
            fn(i)
        wall = time.perf_counter() - t
    seconds, calls = categorise(prof.key_averages())
    return wall / steps, {k: v / steps for k, v in seconds.items()}, {k: c // steps for k, c in calls.items()}


GGML_BLOCKS = (("forward_all", "whole-step graph (a group of one's decode: every layer and the logits)"),
               ("attention", "attention graphs (norm, q/k/v, RoPE, KV write, flash attention, wo)"),
               ("mlp", "MLP graphs (norm, gate/up, SwiGLU, down)"),
               ("logits", "logits graph (norm, lm_head)"))
GGML_AROUND = "Python around the graph calls (inputs, graph lookup, output views)"
GGML_BETWEEN = "between blocks (residual adds, embedding, argmax, Python)"


def _ggml_timers(layers):
    """Wrap a GgmlLayers' block methods and its runtime's compute with timers; returns run(fn, steps)."""
    inside: dict[str, float] = defaultdict(float)
    outer: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    current = {"kind": None}
    compute = layers.runtime.compute

    def timed_compute(graph) -> None:
        t = time.perf_counter()
        compute(graph)
        inside[current["kind"]] += time.perf_counter() - t

    def timed(kind: str, fn):
        def call(*args, **kw):
            current["kind"] = kind
            t = time.perf_counter()
            out = fn(*args, **kw)
            outer[kind] += time.perf_counter() - t
            calls[kind] += 1
            return out
        return call

    layers.runtime.compute = timed_compute
    for kind, _ in GGML_BLOCKS:
        setattr(layers, kind, timed(kind, getattr(layers, kind)))

    def run(fn, steps: int) -> tuple[float, dict[str, float], dict[str, int]]:
        for d in (inside, outer, calls):
            d.clear()
        t = time.perf_counter()
        for i in range(steps):
            fn(i)
        wall = (time.perf_counter() - t) / steps
        seconds = {label: inside[kind] / steps for kind, label in GGML_BLOCKS}
        seconds[GGML_AROUND] = sum(outer.values()) / steps - sum(seconds.values())
        counts = {label: calls[kind] // steps for kind, label in GGML_BLOCKS}
        counts[GGML_AROUND] = sum(counts.values())
        return wall, seconds, counts

    return run


def profile_tpi(model: str, threads: int, ids: list[int], decode: int, backend: str, conn) -> None:
    """Child process: build the engine, time decode and prefill unprofiled, then profile both."""
    from tpi.master import EngineOptions, build_local_engine

    eng = build_local_engine(EngineOptions(model=model, context=len(ids) + 3 * decode + 16, threads=threads,
                                           backend=backend))
    n = len(ids)

    def prefill(_i: int = 0) -> int:
        eng.reset()
        return int(eng.forward(ids, 0)[-1].argmax())

    state = {"tok": prefill(), "pos": n}

    def step(_i: int) -> None:
        state["tok"] = int(eng.forward([state["tok"]], state["pos"])[-1].argmax())
        state["pos"] += 1

    for i in range(4):  # warm-up
        step(i)
    times = []
    for i in range(decode):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    prefill()
    prefill_wall = time.perf_counter() - t
    state["pos"] = n
    out = {"decode_wall": median(times), "prefill_wall": prefill_wall, "layers": eng.cfg.n_layers,
           "between": GGML_BETWEEN if backend == "ggml" else BETWEEN}
    profiled = _ggml_timers(eng.model.layers) if backend == "ggml" else _profiled
    out["decode"] = profiled(step, decode)
    out["prefill"] = profiled(prefill, 1)
    conn.send(out)


def run_tpi(model: str, threads: int, ids: list[int], decode: int, backend: str) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=profile_tpi, args=(model, threads, ids, decode, backend, child), daemon=True)
    proc.start()
    try:
        return parent.recv()
    finally:
        proc.join(timeout=60)


def rows_for(tpi: dict, anchor_decode_s: float, anchor_prefill_s: float) -> list[list]:
    d_wall, d_sec, d_calls = tpi["decode"]
    p_wall, p_sec, _ = tpi["prefill"]
    between = tpi["between"]
    d_sec = dict(d_sec, **{between: max(0.0, d_wall - sum(d_sec.values()))})
    p_sec = dict(p_sec, **{between: max(0.0, p_wall - sum(p_sec.values()))})
    names = list(dict.fromkeys([c for c, _ in CATEGORIES] + [OTHER] + list(d_sec) + [between]))
    rows = []
    for name in names:
        ds, ps = d_sec.get(name, 0.0), p_sec.get(name, 0.0)
        if ds == 0.0 and ps == 0.0:
            continue
        rows.append([name, d_calls.get(name, "-") if name != between else "-", 1000 * ds, f"{ds / d_wall:.0%}",
                     1000 * ps, f"{ps / p_wall:.0%}"])
    rows.append(["tpi total, profiled", "-", 1000 * d_wall, "100%", 1000 * p_wall, "100%"])
    rows.append(["tpi total, not profiled", "-", 1000 * tpi["decode_wall"], ratio(anchor_decode_s, tpi["decode_wall"]),
                 1000 * tpi["prefill_wall"], ratio(anchor_prefill_s, tpi["prefill_wall"])])
    rows.append(["llama.cpp total (anchor, own process)", "-", 1000 * anchor_decode_s, "1.00x",
                 1000 * anchor_prefill_s, "1.00x"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, 32, "decode steps timed, then profiled")
    ap.add_argument("--backends", default="ggml,torch", help="tpi backends to profile, comma-separated")
    args = ap.parse_args()
    if args.smoke:
        args.prompt, args.decode = 16, 4
        if args.model is None and not args.synthetic:  # a 2-layer random llama: loads in a second
            args.model = smoke_model(Path(tempfile.mkdtemp(prefix="tpi-profile-smoke-")))
    resolve_model(args)
    llama = IsolatedRunner("llama.cpp", args.model, args.threads, args.prompt + 3 * args.decode + 16)
    try:
        ids = prompt_ids(llama.vocab, args.prompt)
        llama.measure(ids, 4)  # warm-up
        anchor = [llama.measure(ids, args.decode) for _ in range(3)]
    finally:
        llama.close()
    prefill_s = median([args.prompt / a[0] for a in anchor])
    decode_s = median([1.0 / a[1] for a in anchor])
    for backend in args.backends.split(","):
        tpi = run_tpi(args.model, args.threads, ids, args.decode, backend)
        how = ("time inside ggml's graph computation per kind of block, and around it"
               if backend == "ggml" else "torch.profiler self CPU time per category")
        print_table(
            f"Profile ({backend}): {Path(args.model).name} ({tpi['layers']} layers), {args.threads} threads, "
            f"prompt {args.prompt}, {args.decode} decode steps",
            ["where", "calls/token", "decode ms/token", "share", f"prefill ms ({args.prompt} tok)", "share"],
            rows_for(tpi, decode_s, prefill_s),
            notes=[f"{how}, per decode step and for one prefill; shares are of tpi's profiled time. The last rows: "
                   "tpi without the profiler (its ratio is speed against llama.cpp, llama.cpp time / tpi time: above "
                   "1 is faster) and llama.cpp's median of 3 rounds in its own process, same prompt.",
                   f"machine: {machine_info()}", "command: python bench/profile_decode.py " + " ".join(sys.argv[1:])],
        )


if __name__ == "__main__":
    main()
