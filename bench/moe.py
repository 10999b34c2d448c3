"""Qwen3-MoE decode against llama.cpp: one device, a 2-device loopback group per expert placement, and
experts streamed under a memory budget (issue 19's targets).

    python bench/moe.py [--model PATH] [--rounds 3] [--decode 32] [--threads 2] [--budget-fraction 0.6]
    python bench/moe.py --smoke          # the tiny qwen3moe fixture: checks the script runs

Default model: bench/moe_model.py's synthetic Qwen3-MoE (3.98B weights, 0.63B per token, llama.cpp's
Q4_K_M mix), written once under ~/.cache/tpi/bench. Every configuration runs in its own process and
every round runs them all in turn, llama.cpp (2 threads) first: each row's ratio is its decode tok/s
over llama.cpp's of the same round, and the table gives medians over rounds.
- tpi single: one device, 2 threads (the fused MoE graph: llama.cpp's build_moe_ffn).
- tpi group split / whole: master + one `tpi join` worker on loopback, 1 thread each, ratios 1:1;
  "split" gives both every expert at half its columns, "whole" half the experts each.
- tpi streamed: one device under --memory-budget (a fraction of the model's bytes), experts whole per
  block read in place: decode speed, expert hit rate and bytes mapped in per token.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, median, print_table  # noqa: E402

PROMPT = "Mixture-of-experts models route every token to a few experts. Explain why that suits a group of devices"


def measure(step, prefill, tokens: int) -> dict:
    """Prefill, then time `tokens` greedy decode steps one by one (after one warm-up step)."""
    import numpy as np

    ids, logits = prefill()
    tok, pos = int(np.argmax(logits)), len(ids)
    step(tok, pos)  # warm-up: graphs built, pages touched
    times = []
    for i in range(tokens):
        t = time.perf_counter()
        tok = int(np.argmax(step(tok, pos + 1 + i)))
        times.append(time.perf_counter() - t)
    return {"token_s": median(times), "tokens": tokens}


def run_llama_cpp(cfg: dict) -> dict:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=cfg["model"], n_ctx=512, n_batch=512, n_threads=cfg["threads"],
                          n_threads_batch=cfg["threads"], verbose=False)

    def last() -> np.ndarray:
        row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))

    def prefill():
        ids = llm.tokenize(PROMPT.encode(), add_bos=True)
        llm.eval(ids)
        return ids, last()

    def step(tok: int, pos: int):
        llm.eval([tok])
        return last()

    return measure(step, prefill, cfg["tokens"])


def run_tpi(cfg: dict) -> dict:
    from tpi.master import GroupOptions, start_group

    tmp = Path(cfg["tmp"])
    opts = dict(model=cfg["model"], config_dir=tmp / "config", cache_dir=tmp / "cache", threads=cfg["threads"],
                context=512, backend="ggml", worker_backend="ggml", insecure=True)
    if cfg["kind"] == "group":
        opts |= dict(local_workers=1, host="127.0.0.1", ratios=(0.5, 0.5), experts=cfg["placement"])
    if cfg["kind"] == "streamed":
        opts |= dict(memory_budget=cfg["budget"])
    group = start_group(GroupOptions(**opts), on_event=lambda e: None)
    try:
        engine = group.engine

        def prefill():
            ids = engine.tokenizer.encode(PROMPT, add_bos=True, special=True)
            engine.reset()
            return ids, engine.forward(ids, 0)[-1]

        out = measure(lambda tok, pos: engine.forward([tok], pos)[-1], prefill, cfg["tokens"])
        cache = getattr(engine.model.layers, "expert_cache", None)
        if cache is not None:
            st = cache.stats()
            out |= {"hit_rate": st.hit_rate, "expert_mb_per_token": st.bytes_read / 1e6 / (cfg["tokens"] + 1),
                    "hot": cache.hot}
        return out
    finally:
        group.close()


def configurations(args, model_bytes: int) -> list[tuple[str, dict]]:
    budget = int(args.budget_fraction * model_bytes) + (400 << 20)  # + the runtime's own memory
    return [("llama.cpp", {"kind": "llama.cpp", "threads": args.threads}),
            ("tpi single", {"kind": "single", "threads": args.threads}),
            ("tpi group split (2 x 1 thread)", {"kind": "group", "threads": 1, "placement": "split"}),
            ("tpi group whole (2 x 1 thread)", {"kind": "group", "threads": 1, "placement": "whole"}),
            (f"tpi streamed ({args.budget_fraction:.0%} of the weights + 400 MiB)",
             {"kind": "streamed", "threads": args.threads, "budget": budget})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a qwen3moe GGUF (default: bench/moe_model.py's synthetic 4B)")
    ap.add_argument("--cache-dir", type=Path, help="where the synthetic model is kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed per configuration")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-fraction", type=float, default=0.6, help="streamed row: budget = this x model + 400 MiB")
    ap.add_argument("--only", help="comma-separated row prefixes to run (e.g. 'llama.cpp,tpi single')")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cfg = json.loads(args.child)
        print("RESULT " + json.dumps(run_llama_cpp(cfg) if cfg["kind"] == "llama.cpp" else run_tpi(cfg)), flush=True)
        return
    if args.smoke:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from family_models import FAMILY_VARIANTS, write_family_gguf

        args.rounds, args.decode = 1, 4
    with tempfile.TemporaryDirectory(prefix="tpi-bench-moe-") as tmp:
        if args.smoke:
            args.model = str(write_family_gguf(Path(tmp) / "moe.gguf", **FAMILY_VARIANTS["qwen3moe_8x2"]))
        elif not args.model:
            from moe_model import cached_moe_model

            args.model = str(cached_moe_model(args.cache_dir, log=lambda m: print(m, file=sys.stderr)))
        configs = configurations(args, Path(args.model).stat().st_size)
        if args.only:
            configs = [c for c in configs if any(c[0].startswith(p) for p in args.only.split(",")) or c[0] == "llama.cpp"]
        results: dict[str, list[dict]] = {label: [] for label, _ in configs}
        for r in range(args.rounds):
            for i, (label, cfg) in enumerate(configs):
                cfg = cfg | {"model": args.model, "tokens": args.decode, "tmp": str(Path(tmp) / f"c{i}")}
                print(f"round {r + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE,
                                     text=True, check=True, timeout=3600)
                results[label].append(json.loads(next(x for x in out.stdout.splitlines()
                                                      if x.startswith("RESULT "))[len("RESULT "):]))
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    anchor = results["llama.cpp"]
    rows = []
    for label, runs in results.items():
        ratios = [a["token_s"] / m["token_s"] for m, a in zip(runs, anchor)]  # same round: paired
        extra = ""
        if "hit_rate" in runs[0]:
            extra = (f"hit rate {median([m['hit_rate'] for m in runs]):.0%}, hot {runs[0]['hot']}/block, "
                     f"{median([m['expert_mb_per_token'] for m in runs]):.0f} MB experts mapped in per token")
        rows.append([label, 1.0 / median([m["token_s"] for m in runs]), f"{median(ratios):.2f}x", extra])
    print_table(f"Qwen3-MoE decode: {Path(args.model).name}, {args.decode} tokens, {args.rounds} rounds",
                ["engine", "decode tok/s", "vs llama.cpp", "experts"], rows,
                notes=[f"medians over rounds; ratio paired per round against llama.cpp ({args.threads} threads)",
                       f"machine: {machine_info()}", "command: python bench/moe.py " + " ".join(sys.argv[1:])])


if __name__ == "__main__":
    main()
