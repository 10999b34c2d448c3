"""How long the resume replay (tpi.master.resume.replay) takes over a 600-token history, against the plain
chunked replay it replaced (decoded tokens in plain steps of 63 rows, 3 on repacked types; not exact
past position 512 or on float / K-quant weights). Interleaved pairs, medians, ratio after / before.

    flock /work/coord/bench.lock .venv/bin/python bench/replay_time.py [--model PATH] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time

from common import machine_info, median

from tpi.formats import default_model_path, open_model
from tpi.master import EngineOptions, build_local_engine
from tpi.master.generate import SequenceState
from tpi.master import resume
from tpi.master.resume import REPACKED_TYPES, replay, replay_chunk
from tpi.master.sampler import SamplingParams
from tpi.model.config import PREFILL_CHUNK, layer_name
from tpi.quant.formats import ggml_type_info, is_ggml


def plain_chunk(source) -> int:
    """The rows per replay step before exact replay: 3 with a repacked weight type, else 63."""
    cfg = source.config
    fmts = {source.weight_fmt(layer_name(i, m)) for i in range(cfg.n_layers) for m in ("wq", "w_gate")}
    return 3 if {ggml_type_info(f).name for f in fmts if is_ggml(f)} & REPACKED_TYPES else 63


def plain_replay(engine, history: list[int], prompt: int, chunk: int) -> None:
    """The replay before exact steps: the prompt as read, then the rest in plain steps of chunk rows."""
    engine.reset()
    for i in range(0, prompt, PREFILL_CHUNK):
        engine.forward(history[i:min(prompt, i + PREFILL_CHUNK)], i)
    for i in range(prompt, len(history) - 1, chunk):
        engine.forward(history[i:min(len(history) - 1, i + chunk)], i)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=20)
    ap.add_argument("--history", type=int, default=600, help="tokens streamed before the loss")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--exact-chunk", type=int, default=resume.EXACT_CHUNK, help="rows per exact replay step")
    args = ap.parse_args()
    model = args.model or str(default_model_path())
    source = open_model(model)
    engine = build_local_engine(EngineOptions(model, context=1024, threads=args.threads, backend="ggml"))
    vocab = engine.cfg.vocab
    prompt = [1 + (7 * i) % (vocab - 1) for i in range(args.prompt)]
    tokens = [1 + (13 * i) % (vocab - 1) for i in range(args.history)]
    seq = SequenceState.start(prompt, SamplingParams(temperature=0.0), 1000, engine.tokenizer)
    seq.out.tokens.extend(tokens)
    chunk, old = replay_chunk(source), plain_chunk(source)
    steps = resume.replay_steps  # replay() calls it with the default exact_chunk: pass --exact-chunk through
    resume.replay_steps = lambda runs, c: steps(runs, c, args.exact_chunk)
    before, after = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        plain_replay(engine, seq.history(), len(prompt), old)
        before.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        replay(engine, seq, chunk)
        after.append(time.perf_counter() - t0)
    engine.model.weights.close()
    print(json.dumps({"model": model, "threads": args.threads, "history": args.prompt + args.history,
                      "plain_chunk": old, "replay_chunk": chunk, "exact_chunk": args.exact_chunk,
                      "before_s": round(median(before), 3), "after_s": round(median(after), 3),
                      "ratio_after_before": round(median(after) / median(before), 2),
                      "machine": machine_info()}))


if __name__ == "__main__":
    main()
