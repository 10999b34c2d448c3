"""Speculative decoding through a group: N = 2 and 3 give plain decoding's tokens, greedy and sampled.

A real loopback group (worker processes) on a tiny Q4_K_M model (K-quant kernels change with the
row count, so only exact rows keep the verify pass's logits the decode steps' on every rank). The
drafter proposes the plain run's own continuation with every third token wrong, so every verify pass
keeps some drafts and rejects one: the rejected positions' keys and values are rolled back on every
rank (overwritten by the next step), and any rank that kept one would change the next tokens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_factory import quantize_with_llama_cpp
from test_speculation import ScriptedDrafter
from tpi.master import GroupOptions, start_group
from tpi.master.sampler import SamplingParams
from tpi.master.speculation import SpeculationOptions, build_speculator

pytestmark = pytest.mark.slow
TOKENS = 32


@pytest.fixture(scope="module")
def q4km(tiny_gguf, tiny_dir: Path) -> Path:
    pytest.importorskip("llama_cpp")
    f16 = tiny_gguf(arch="llama", weight_type="F16", hidden=256, intermediate=512, n_heads=4, n_kv_heads=2, seed=3)
    return quantize_with_llama_cpp(f16, tiny_dir / "spec-group-q4km.gguf", "Q4_K_M")


def run(engine, prompt: list[int], params: SamplingParams, drafter=None, mode: str = "off"):
    engine.speculator = build_speculator(SpeculationOptions(mode=mode), engine)
    if drafter is not None:
        engine.speculator.drafter = drafter
    try:
        engine.reset()
        return engine.generate(prompt, params, TOKENS, ignore_eos=True)
    finally:
        engine.speculator = None


@pytest.mark.parametrize("world", [2, 3])
def test_group_speculation_gives_plain_tokens(world, q4km, tmp_path):
    group = start_group(GroupOptions(model=str(q4km), local_workers=world - 1, host="127.0.0.1",
                                     ratios=(1.0 / world,) * world, threads=1, backend="ggml",
                                     worker_backend="ggml", config_dir=tmp_path / "c", cache_dir=tmp_path / "k",
                                     join_timeout_s=180))
    try:
        engine = group.engine
        assert engine.comm.world == world
        prompt = [int(t) for t in np.random.default_rng(1).integers(3, engine.cfg.vocab, 40)]
        for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=5)):
            plain = run(engine, prompt, params)
            spec = run(engine, prompt, params, ScriptedDrafter(prompt, plain.tokens), mode="lookup")
            assert spec.tokens == plain.tokens, params
            stats = spec.speculation
            assert 0 < stats["spec_accepted"] < stats["spec_drafted"] and stats["tokens_per_forward"] > 1.5, stats
            looked_up = run(engine, prompt, params, mode="auto")  # prompt lookup on the model's own loops
            assert looked_up.tokens == plain.tokens, params
    finally:
        group.close()
