"""Memory budgets: a synthetic model with Llama-2-7B layer shapes, pinned vs streamed from disk.

    python bench/memory.py            # 16 layers of hidden 4096 / intermediate 11008 (~1.9 GB int4 store)
    python bench/memory.py --backend ggml   # the same on ggml (streamed blocks mapped, not copied)
    python bench/memory.py --smoke    # 2 small layers, budgets found by probing: checks the bench runs

The model is a Q4_0 GGUF of random int4 blocks (fp16 scales near 0.004) with a small byte-level
vocabulary. Every configuration runs in a fresh process (`start_group`, as `tpi run` does), so
peak RSS (VmHWM) is that run's own. Measured in one run:
  * decode tokens/s all-pinned against streamed under --budget-mb (whole-process budget);
  * streamed with a cold page cache (the product: every released block is DONTNEEDed) against a
    warm one (bench-only: release keeps the page cache, so reads are memory copies);
  * peak RSS against the budget; overlap = 1 - stall / time in forward passes;
  * a 2-device loopback group with budgets on both ranks;
  * the disk's cold sequential read speed, and the per-block cost of reading vs preparing
    (torch: the int4 repack; ggml: mapping the kernel-layout copy) an MLP block, which bound what
    streaming can reach.
Medians over the timed decode steps; the machine is shared, so compare rows, not runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))
from common import machine_info, peak_rss_bytes, print_machine, print_table  # noqa: E402

MB = 1 << 20
LLAMA2_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32)
SMOKE = dict(hidden=256, intermediate=512, heads=4, kv_heads=4)
MINIMUM = re.compile(r"minimum feasible budget is [\d.]+ \S+ \((\d+) bytes")


# ---------------------------------------------------------------- the synthetic model

def write_model(path: Path, shapes: dict, layers: int, vocab: int, context: int) -> Path:
    """A llama GGUF of random Q4_0 blocks; each shape's bytes are drawn once and reused per layer."""
    import gguf

    sys.path.insert(0, str(BENCH.parent / "tests"))
    from model_factory import minimal_tokenizer, write_gguf_tokenizer

    h, inter = shapes["hidden"], shapes["intermediate"]
    rng = np.random.default_rng(0)
    q4 = gguf.GGMLQuantizationType.Q4_0

    def random_q4(n: int, k: int) -> np.ndarray:
        blocks = np.empty((n, k // 32, 18), np.uint8)  # per block: fp16 scale, 16 bytes of nibbles
        blocks[..., :2] = (0.004 * rng.uniform(0.5, 1.5, (n, k // 32))).astype(np.float16)[..., None].view(np.uint8)
        blocks[..., 2:] = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
        return blocks.reshape(n, -1)

    square, up, down = random_q4(h, h), random_q4(inter, h), random_q4(h, inter)
    norm = np.ones(h, np.float32)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"synthetic-llama2-7b-shapes-{layers}l")
    for add, value in ((w.add_vocab_size, vocab), (w.add_context_length, context), (w.add_embedding_length, h),
                       (w.add_feed_forward_length, inter), (w.add_block_count, layers),
                       (w.add_head_count, shapes["heads"]), (w.add_head_count_kv, shapes["kv_heads"]),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0),
                       (w.add_rope_dimension_count, h // shapes["heads"]),
                       (w.add_file_type, gguf.LlamaFileType.MOSTLY_Q4_0),
                       (w.add_quantization_version, gguf.GGML_QUANT_VERSION)):
        add(value)
    write_gguf_tokenizer(w, minimal_tokenizer(vocab))
    w.add_tensor("token_embd.weight", random_q4(vocab, h), raw_dtype=q4)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", square, raw_dtype=q4)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", up, raw_dtype=q4)
        w.add_tensor(f"blk.{i}.ffn_up.weight", up, raw_dtype=q4)
        w.add_tensor(f"blk.{i}.ffn_down.weight", down, raw_dtype=q4)
    w.add_tensor("output_norm.weight", norm)
    w.add_tensor("output.weight", random_q4(vocab, h), raw_dtype=q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- one configuration (child process)

def run_config(cfg: dict) -> dict:
    """Start the group, prefill, time decode steps; streaming figures over the decode steps."""
    import functools

    from tpi.master import GroupOptions, start_group
    from tpi.scheduler.store import ShardStore

    if cfg["warm"]:  # bench-only: released blocks stay in the page cache
        ShardStore.release = functools.partialmethod(ShardStore.release, drop_cache=False)
    workers = cfg["workers"]
    t0 = time.perf_counter()
    group = start_group(GroupOptions(
        model=cfg["model"], context=cfg["context"], threads=cfg["threads"], memory_budget=cfg["budget"],
        backend=cfg["backend"], worker_backend=cfg["backend"],
        local_workers=workers, worker_memory_budget=cfg["budget"] if workers else None,
        ratios=(0.5, 0.5) if workers else None, insecure=True, cache_dir=Path(cfg["cache"]),
        config_dir=Path(cfg["cache"]) / "config", join_timeout_s=600))
    load_s = time.perf_counter() - t0
    try:
        e = group.engine
        weights = e.model.weights
        logits, _ = e.prefill(list(range(3, 3 + cfg["prompt"])))
        stats = weights.token_stats  # resident and streamed weights both have it
        stats()  # the interval starts at the first decode step
        times, tok, pos = [], int(np.argmax(logits)), cfg["prompt"]
        for _ in range(cfg["tokens"]):
            t = time.perf_counter()
            tok = int(np.argmax(e.forward([tok], pos)[-1]))
            times.append(time.perf_counter() - t)
            pos += 1
        s = stats()
        plan = getattr(weights, "plan", None)
        return {"load_s": load_s, "token_s": statistics.median(times), "tokens_s": 1 / statistics.median(times),
                "stall_s_per_token": s.get("stall_s_per_token", 0.0), "overlap": s.get("overlap", 1.0),
                "bytes_read_per_token": s.get("bytes_read_per_token", 0),
                "pinned": len(plan.pinned) if plan else None, "streamed": len(plan.streamed) if plan else 0,
                "window": plan.window if plan else 0, "plan": plan.describe() if plan else "all pinned",
                "peak_rss": peak_rss_bytes(), "worker_peak_rss": peak_rss_bytes(group.procs[0].pid) if workers else 0}
    finally:
        group.close()


def run_child(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        found = MINIMUM.findall(re.sub(r"\s+", " ", proc.stderr))
        return {"failed": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"],
                "minimum": int(found[-1]) if found else None}
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------- disk and per-block costs

def cold_read_mb_s(path: Path, limit: int = 1 << 30) -> float:
    """Sequential read speed of `path` after dropping it from the page cache (8 MiB reads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = memoryview(bytearray(8 * MB))
        done, t = 0, time.perf_counter()
        while done < limit and (n := os.preadv(fd, [buf], done)):
            done += n
        seconds = time.perf_counter() - t
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return done / MB / seconds
    finally:
        os.close(fd)


def block_costs(store_path: Path, threads: int, backend: str, reps: int = 3) -> dict:
    """Median ms to read the largest block cold, warm, and to prepare it as a streamed block is."""
    from tpi.model.config import config_from_dict
    from tpi.model.backends import make_layers
    from tpi.scheduler.store import ShardStore
    from tpi.devices.slicing import shard_from_dict

    with ShardStore.open(store_path) as store:
        key, nbytes = max(((k, n) for k, n in store.block_sizes() if k != "globals"), key=lambda kn: kn[1])
        cfg = config_from_dict(store.meta["config"])
        layers = make_layers(backend, cfg, shard_from_dict(store.meta["shard"], cfg), 8, threads)
        prepare = layers.to_runtime  # torch: the int4 repack of the block just read
        if hasattr(layers, "runtime_for"):  # ggml: map the kernel-layout copy written by the streamed runs
            from tpi.model.weights import kernel_layout_store

            packed = kernel_layout_store(store, layers)
            stream = layers.runtime_for(packed)[1]
            prepare = lambda _block: stream(packed.load(key, copy=False))  # noqa: E731
        cold, warm, prep = [], [], []
        for _ in range(reps):
            store.release(key)
            t = time.perf_counter()
            store.load(key)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            block = store.load(key)  # the pages are cached now
            warm.append(time.perf_counter() - t)
            t = time.perf_counter()
            prepare(block)
            prep.append(time.perf_counter() - t)
            del block
        store.release(key)
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return {"block": key, "mb": nbytes / MB, "cold_ms": ms(cold), "warm_ms": ms(warm), "prepare_ms": ms(prep)}


# ---------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="layers of Llama-2-7B shape (16: ~1.9 GB int4 store)")
    ap.add_argument("--budget-mb", type=int, default=800, help="whole-process budget of the single device")
    ap.add_argument("--group-budget-mb", type=int, default=560, help="budget of each rank in the 2-device group")
    ap.add_argument("--tokens", type=int, default=4, help="decode steps timed per configuration")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per process (1: the machine is shared)")
    ap.add_argument("--backend", default="torch", help="kernel backend of every engine (torch, ggml, numpy)")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of (all pinned, streamed warm) runs for their ratio")
    ap.add_argument("--smoke", action="store_true", help="2 small layers; budgets probed as minimum + 32 MiB")
    ap.add_argument("--dir", type=Path, help="keep the model and stores here (default: a temporary directory)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_config(json.loads(args.child))), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="tpi-bench-memory-") as tmp_dir:
        run(args, args.dir or Path(tmp_dir))


def run(args, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    shapes, layers = (SMOKE, 2) if args.smoke else (LLAMA2_7B, args.layers)
    context, prompt, tokens = 64, 8, (2 if args.smoke else args.tokens)
    model = work / f"synthetic-{shapes['hidden']}-{layers}l.gguf"
    if not model.exists():
        print(f"writing {model.name}…", file=sys.stderr, flush=True)
        write_model(model, shapes, layers, vocab=384, context=context)
    info = machine_info()
    base = {"model": str(model), "context": context, "prompt": prompt, "tokens": tokens, "threads": args.threads,
            "backend": args.backend,
            "cache": str(work / "cache"), "warm": False, "workers": 0, "budget": None}

    def budget_for(mb: int, workers: int) -> int:
        # smoke: the group's rank 0 holds half the weights, so the single device's minimum fits it too
        return minimum[0] + 32 * MB if args.smoke else mb * MB

    # Refused probes first: they write the stores (cutting maps the model file, which would land in the
    # measured run's VmHWM) and give each configuration's minimum feasible budget.
    minimum = {w: run_child(dict(base, budget=1, workers=w)).get("minimum") for w in ((0,) if args.smoke else (0, 1))}
    single, group = budget_for(args.budget_mb, 0), budget_for(args.group_budget_mb, 1)
    configs = [("all pinned", {}), ("streamed, cold page cache", {"budget": single}),
               ("streamed, warm page cache", {"budget": single, "warm": True}),
               ("2 devices, budgets, cold", {"budget": group, "workers": 1})]
    results = []
    for label, extra in configs:
        print(f"running: {label}", file=sys.stderr, flush=True)
        results.append((label, extra.get("budget"), run_child(dict(base, **extra))))
    pairs = [(results[0][2], results[2][2])]  # (all pinned, streamed warm): the ratio the target is on
    for i in range(args.repeats - 1):  # more pairs, back to back, so that both rows see the same load
        print(f"running: all pinned / streamed warm, pair {i + 2}", file=sys.stderr, flush=True)
        pairs.append((run_child(dict(base, **configs[0][1])), run_child(dict(base, **configs[2][1]))))
    disk = cold_read_mb_s(model)
    stores = sorted((work / "cache" / "master").glob("*.tpis"), key=lambda p: p.stat().st_size)
    costs = block_costs(stores[-1], args.threads, args.backend) if stores else None
    report(results, model, disk, costs, info, minimum, args.backend, pairs)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "disk_mb_s": disk, "block": costs, "minimum": minimum,
                                         "runs": [{"label": lb, "budget": b, **r} for lb, b, r in results]}, indent=2))


def report(results, model: Path, disk: float, costs: dict | None, info: dict, minimum: dict, backend: str,
           pairs: list[tuple[dict, dict]]) -> None:
    print_machine(info)
    pinned = results[0][2].get("tokens_s")
    ok = [(p["tokens_s"], w["tokens_s"]) for p, w in pairs if "tokens_s" in p and "tokens_s" in w]
    rows = []
    for label, budget, r in results:
        if "failed" in r:
            rows.append([label, budget and f"{budget / MB:.0f}", "failed: " + r["failed"][0][:60]] + [""] * 7)
            continue
        read_mb = r["bytes_read_per_token"] / MB
        peaks = f"{r['peak_rss'] / MB:.0f}" + (f" / {r['worker_peak_rss'] / MB:.0f}" if r["worker_peak_rss"] else "")
        rows.append([label, f"{budget / MB:.0f}" if budget else "-", f"{r['tokens_s']:.3g}",
                     f"{r['tokens_s'] / pinned:.2f}x" if pinned else "n/a",
                     f"{r['pinned']}/{r['streamed']}/{r['window']}" if r["pinned"] is not None else "all",
                     f"{read_mb:.0f}", f"{read_mb / r['token_s']:.0f}" if read_mb else "-",
                     f"{1e3 * r['stall_s_per_token']:.0f}", f"{r['overlap']:.2f}", peaks])
    notes = [f"model: {model.name}, {model.stat().st_size / MB:.0f} MiB on disk; budgets are whole-process "
             "(weights + KV + transients + measured runtime); group rows: rank 0's streaming figures, "
             "peak RSS master / worker",
             f"disk: cold sequential read {disk:.0f} MiB/s (the limit streaming can approach)",
             "minimum feasible budget: " + ", ".join(
                 f"{'2-device rank 0' if w else 'single device'} {m / MB:.0f} MiB" for w, m in minimum.items() if m)]
    if len(ok) > 1:
        ratios = sorted(w / p for p, w in ok)
        notes.append(f"streamed warm vs all pinned over {len(ok)} back-to-back pairs of runs: median "
                     f"{statistics.median(ratios):.2f}x (each pair: {', '.join(f'{r:.2f}' for r in ratios)}); "
                     f"all pinned {statistics.median(p for p, _ in ok):.3g} tok/s, streamed warm "
                     f"{statistics.median(w for _, w in ok):.3g} tok/s")
    if costs:
        how = "map its kernel-layout copy" if backend == "ggml" else f"{backend} to_runtime"
        notes.append(f"largest block {costs['block']} ({costs['mb']:.0f} MiB): read cold {costs['cold_ms']:.0f} ms, "
                     f"read warm {costs['warm_ms']:.0f} ms, prepare ({how}) {costs['prepare_ms']:.0f} ms")
    print_table(f"decode under a memory budget, {backend} backend (medians)",
                ["configuration", "budget MiB", "tok/s", "vs pinned", "pinned/streamed/window", "read MiB/tok",
                 "read MiB/s", "stall ms/tok", "overlap", "peak RSS MiB"], rows, notes)


if __name__ == "__main__":
    main()
