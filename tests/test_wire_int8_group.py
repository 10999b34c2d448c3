"""The int8 wire against the f32 wire on SmolLM2, in real 2-device loopback groups.

Issue 18's bar for letting the planner choose int8 on its own: last-token logits correlation
>= 0.999 against the f32 wire, and the same greedy tokens, on the test prompts.

* torch backend: correlation met (0.9994-0.9998), greedy tokens not on every prompt: since the
  weights stay in their GGUF types (converted at prepare), one prompt parts within 16 tokens.
* ggml backend (llama.cpp's kernels, 8-bit activations): not met. Correlation 0.9985-0.9994,
  greedy tokens part after 4-22 of 32; the bf16 wire parts after 5 on one prompt there too:
  ggml's activation quantization amplifies any change to the residual. Measured on a trial
  merge with the ggml engine; asserted below at the level measured.
So int8 stays opt-in (`--wire-dtype int8`; tpi.devices.planner.AUTO_INT8). Plain linear int8
(llama.cpp's Q8_0, distributed-llama's Q80) gave 0.998-0.9989 on torch and parted within 5
tokens on three of six prompts: the square-root code is why this wire is this close.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOLLM2_CHAT_PROMPT

from tpi.master import GroupOptions, start_group
from tpi.master.sampler import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is Paris. The capital of Italy is", "Once upon a time",
           "The zanzibar heron counts seventeen violet lanterns", "Name three primary colors.",
           SMOLLM2_CHAT_PROMPT)
GREEDY_TOKENS = 16
# backend -> (minimum last-token correlation, greedy tokens must match)
BAR = {"torch": (0.999, False), "ggml": (0.998, False)}


def run_group(model: Path, wire: str, backend: str, tmp: Path) -> list[tuple[np.ndarray, list[int]]]:
    """(last-token logits of the prompt, greedy tokens) per prompt, from a 2-device group on this wire."""
    group = start_group(GroupOptions(model=str(model), local_workers=1, host="127.0.0.1", ratios=(0.5, 0.5),
                                     wire_dtype=wire, backend=backend, worker_backend=backend,
                                     config_dir=tmp / "config", cache_dir=tmp / "cache", join_timeout_s=300))
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


@pytest.mark.parametrize("backend", sorted(BAR))
def test_int8_wire_keeps_smollm2_close_to_the_f32_wire(smollm2, tmp_path, backend):
    if backend == "ggml" and importlib.util.find_spec("tpi.model.layers_ggml") is None:
        pytest.skip("this tpi has no ggml backend")
    min_corr, same_tokens = BAR[backend]
    f32 = run_group(smollm2, "f32", backend, tmp_path)
    int8 = run_group(smollm2, "int8", backend, tmp_path)
    for prompt, (ref, ref_tokens), (got, tokens) in zip(PROMPTS, f32, int8):
        corr = float(np.corrcoef(got, ref)[0, 1])
        top2 = np.sort(ref)[-2:]
        print(f"{backend} {prompt[:32]!r}: corr {corr:.6f}, max|diff| {np.abs(got - ref).max():.3f}, "
              f"top-2 margin {top2[1] - top2[0]:.3f}, tokens {'same' if tokens == ref_tokens else 'differ'}")
        assert corr >= min_corr, f"{prompt!r}: last-token logits correlation {corr:.6f}"
        if same_tokens:
            assert tokens == ref_tokens, f"{prompt!r}: greedy tokens differ from the f32 wire's"
