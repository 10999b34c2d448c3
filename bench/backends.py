"""Single-device torch backend vs numpy backend: decode/prefill tokens/s and ms per kernel per layer.

    python bench/backends.py            # SmolLM2-135M, all 30 layers
    python bench/backends.py --smoke    # first 2 layers, a few tokens: checks the bench runs

Kernels are timed at decode shape (T = 1) on layer 0 through the same seam the model uses;
"attention rest" / "mlp rest" are a block's time minus its linears (norm, RoPE, attention over
the cache, SiLU, Python overhead). Kernel times are the best of repeated calls: on a shared
machine a woken thread pool sometimes waits a whole scheduler slice (~8 ms), which a median
would report as the kernel's cost.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table as markdown_table  # noqa: E402

BACKENDS = ("torch", "numpy")
QUESTION = ("Explain step by step how a tensor-parallel transformer splits attention heads and MLP columns "
            "across several small devices, and why the partial results must be summed after each block. ")


@dataclass(frozen=True)
class BenchConfig:
    model: str | None = None  # None = embedded SmolLM2
    layers: int | None = None  # keep only the first N layers (None = all)
    prompt: int = 64
    decode: int = 32
    reps: int = 50
    threads: int | None = None


def build(cfg_bench: BenchConfig, backend: str):
    """A single-device engine (as tpi.master.group builds rank 0), optionally cut to the first layers."""
    from tpi.devices.slicing import plan_shards
    from tpi.model.backends import make_layers
    from tpi.formats import open_model
    from tpi.master.engine import Engine
    from tpi.model.transformer import ResidentWeights, Transformer
    from tpi.master.shard import iter_rank_blocks

    source = open_model(cfg_bench.model)
    cfg = source.config
    if cfg_bench.layers:
        cfg = replace(cfg, n_layers=min(cfg.n_layers, cfg_bench.layers))
    context = cfg_bench.prompt + cfg_bench.decode + 8
    (shard,) = plan_shards(cfg, [1.0])
    layers = make_layers(backend, cfg, shard, context, cfg_bench.threads)
    blocks, embed = {}, None
    for key, (blk,) in iter_rank_blocks(source, cfg, [shard]):
        if key == "globals":
            embed = blk.pop("embed")
        blocks[key] = layers.to_runtime(blk)
    return Engine(cfg, None, Transformer(cfg, layers, ResidentWeights(blocks)), embed, context), source


def prompt_ids(source, n: int, vocab: int) -> list[int]:
    """n tokens of a chat prompt (random ids when the model's tokenizer cannot load here)."""
    from tpi.errors import TpiError

    try:
        tok = source.tokenizer()
        ids = tok.apply_chat_template([{"role": "user", "content": QUESTION * (1 + n // 20)}])
    except (ImportError, TpiError, ValueError):
        return np.random.default_rng(0).integers(0, vocab, n).tolist()
    return ids[:n]


def best_ms(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def generation_speed(engine, ids: list[int], cfg_bench: BenchConfig) -> dict:
    """Prefill the prompt (best of 3), then greedy-decode; tokens/s of each phase and the tokens.

    Decode tokens/s is 1 / the median step time: a shared machine stalls single steps, and a
    total over all steps would report those stalls as the backend's speed.
    """
    engine.forward(ids[:8], 0)  # warm-up (allocations, thread pools)
    prefill_s = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        logits = engine.forward(ids, 0)[-1]
        prefill_s = min(prefill_s, time.perf_counter() - t)
    tokens, steps = [], []
    for i in range(cfg_bench.decode):
        tokens.append(int(np.argmax(logits)))
        t = time.perf_counter()
        logits = engine.forward(tokens[-1:], len(ids) + i)[-1]
        steps.append(time.perf_counter() - t)
    return {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": 1.0 / statistics.median(steps), "tokens": tokens}


class StubLinear:
    """Returns a precomputed output: times a block without its matmuls."""

    def __init__(self, w):
        self.w, self.y = w, None

    def __call__(self, x):
        if self.y is None:
            self.y = self.w(x)
        return self.y


def with_stub_linears(block: dict) -> dict:
    return {k: StubLinear(v) if callable(v) else v for k, v in block.items()}


def kernel_times(engine, cfg_bench: BenchConfig) -> dict[str, float]:
    """ms per call at T = 1 for layer 0's linears and blocks, plus the lm_head, on this backend."""
    L, W = engine.model.layers, engine.model.weights
    attn, mlp, glob = W.get("L0.attn"), W.get("L0.mlp"), W.get("globals")
    reps = cfg_bench.reps
    hidden = engine.cfg.hidden
    rng = np.random.default_rng(1)

    def act(k: int):
        x = rng.standard_normal((1, k)).astype(np.float32)
        return L.kernels.activations(x) if L.name == "torch" else x

    def linear(w):
        x = act(w.in_features)
        return lambda: w(x)

    out = {}
    for name, w in (("wqkv", attn["wqkv"]), ("wo", attn["wo"]), ("wgu", mlp["wgu"]), ("wdown", mlp["wdown"])):
        out[f"{name} [{w.in_features}x{w.out_features}] {w.kernel}"] = best_ms(linear(w), reps)
    h = L.hidden_from_numpy(rng.standard_normal((1, hidden)).astype(np.float32))
    pos = cfg_bench.prompt  # attention over a cache of `prompt` positions
    attn_rest, mlp_rest = with_stub_linears(attn), with_stub_linears(mlp)
    out["attention rest (norm, rope, sdpa)"] = best_ms(lambda: L.attention(h, attn_rest, 0, pos), reps)
    out["mlp rest (norm, silu)"] = best_ms(lambda: L.mlp(h, mlp_rest), reps)
    out["attention block"] = best_ms(lambda: L.attention(h, attn, 0, pos), reps)
    out["mlp block"] = best_ms(lambda: L.mlp(h, mlp), reps)
    head = glob["lm_head"]
    out[f"lm_head [{head.in_features}x{head.out_features}] {head.kernel} (per token)"] = best_ms(
        lambda: L.logits(h, glob, False), max(5, reps // 5))
    return out


def run(cfg_bench: BenchConfig) -> dict:
    results = {}
    for backend in BACKENDS:
        engine, source = build(cfg_bench, backend)
        ids = prompt_ids(source, cfg_bench.prompt, engine.cfg.vocab)
        kernels = kernel_times(engine, cfg_bench)
        per_token_ms = engine.cfg.n_layers * (kernels["attention block"] + kernels["mlp block"]) + list(kernels.values())[-1]
        results[backend] = {"kernels": kernels, "kernel_tok_s": 1e3 / per_token_ms,
                            **generation_speed(engine, ids, cfg_bench)}
        results["model"] = f"{engine.cfg.name}, {engine.cfg.n_layers} layers"
        del engine
    return results


def print_table(results: dict) -> None:
    """Markdown through bench/common.print_table (rich on a terminal), ratio column = numpy / torch."""
    t, n = results["torch"], results["numpy"]
    rows = []
    for (name, tm), (_, nm) in zip(t["kernels"].items(), n["kernels"].items()):
        label = name.replace("int4pack", "q4").replace("int8pack", "q8")
        rows.append([label, tm, nm, f"{nm / tm:.1f}x" if tm > 0 else "-"])
    labels = (("kernel_tok_s", "decode tokens/s from kernel times (layers x blocks + lm_head)"),
              ("decode_tok_s", "decode tokens/s (1 / median step)"), ("prefill_tok_s", "prefill tokens/s"))
    for key, label in labels:
        rows.append([label, t[key], n[key], f"{t[key] / n[key]:.1f}x"])
    same = t["tokens"] == n["tokens"]
    notes = [f"greedy tokens identical: {same}", "command: python bench/backends.py " + " ".join(sys.argv[1:])]
    markdown_table(f"torch vs numpy backend, single device: {results['model']}",
          ["kernel (layer 0, T=1)", "torch ms", "numpy ms", "ratio"], rows, notes=notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2)")
    p.add_argument("--smoke", action="store_true", help="2 layers, few tokens and repetitions")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--decode", type=int, default=32, help="decoded tokens")
    p.add_argument("--threads", type=int, default=None, help="compute threads (torch; numpy if threadpoolctl)")
    a = p.parse_args()
    cfg = BenchConfig(model=a.model, prompt=a.prompt, decode=a.decode, threads=a.threads)
    if a.smoke:
        cfg = replace(cfg, layers=2, prompt=8, decode=4, reps=3)
    print_table(run(cfg))


if __name__ == "__main__":
    main()
