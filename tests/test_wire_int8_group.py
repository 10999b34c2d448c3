"""The int8 wire against the f32 wire on SmolLM2, in real 2-device loopback groups.

Issue 18's bar for letting the planner choose int8 on its own: last-token logits correlation
>= 0.999 against the f32 wire, and the same greedy tokens, on the test prompts. Measured here
(torch backend): correlation 0.9994-0.9999 and the same 16 greedy tokens on all five prompts
(over 32 tokens two prompts part at a near-tie, where the bf16 wire parts too). Plain linear
int8 (llama.cpp's Q8_0, distributed-llama's Q80) gave 0.998-0.9989 and parted within 5 tokens
on three of six prompts: the square-root code is why this wire passes (tpi/transport/wire.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SMOLLM2_CHAT_PROMPT

from tpi.group import GroupOptions, start_group
from tpi.sampler import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is Paris. The capital of Italy is", "Once upon a time",
           "The zanzibar heron counts seventeen violet lanterns", "Name three primary colors.",
           SMOLLM2_CHAT_PROMPT)
GREEDY_TOKENS = 16
MIN_CORRELATION = 0.999


def run_group(model: Path, wire: str, tmp: Path) -> list[tuple[np.ndarray, list[int]]]:
    """(last-token logits of the prompt, greedy tokens) per prompt, from a 2-device group on this wire."""
    group = start_group(GroupOptions(model=str(model), local_workers=1, host="127.0.0.1", ratios=(0.5, 0.5),
                                     wire_dtype=wire, config_dir=tmp / "config", cache_dir=tmp / "cache",
                                     join_timeout_s=300))
    try:
        engine = group.engine
        assert engine.comm.world == 2 and engine.comm.wire_dtype == wire
        out = []
        for prompt in PROMPTS:
            ids = engine.tokenizer.encode(prompt, add_bos=True, special=True)
            engine.reset()
            last = engine.forward(ids, 0)[-1].astype(np.float32).copy()
            engine.reset()
            tokens = engine.generate(ids, SamplingParams(temperature=0.0), GREEDY_TOKENS, ignore_eos=True).tokens
            out.append((last, tokens))
        return out
    finally:
        group.close()


def test_int8_wire_keeps_smollm2_logits_and_greedy_tokens_of_the_f32_wire(smollm2, tmp_path):
    f32 = run_group(smollm2, "f32", tmp_path)
    int8 = run_group(smollm2, "int8", tmp_path)
    for prompt, (ref, ref_tokens), (got, tokens) in zip(PROMPTS, f32, int8):
        corr = float(np.corrcoef(got, ref)[0, 1])
        top2 = np.sort(ref)[-2:]
        print(f"{prompt[:32]!r}: corr {corr:.6f}, max|diff| {np.abs(got - ref).max():.3f}, "
              f"top-2 margin {top2[1] - top2[0]:.3f}, tokens {'same' if tokens == ref_tokens else 'differ'}")
        assert corr >= MIN_CORRELATION, f"{prompt!r}: last-token logits correlation {corr:.6f}"
        assert tokens == ref_tokens, f"{prompt!r}: greedy tokens differ from the f32 wire's"
