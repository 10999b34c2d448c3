"""Speculative decoding on Qwen3-MoE keeps plain decoding's tokens: a verify pass's rows are, bit for bit,
its decode steps' on one device and in groups of 2 with either expert placement, F32 and Q4_K_M.

Before exact rows reached the experts a verify pass differed (tpi.model.ggml_exact): the router's F32
mul_mat went to tinyBLAS from 2 rows on, and a K-quant expert (Q4_K_M's Q6_K down) that 8 of 9 rows
name went to the tiled kernel. The reference is the same layers run one token at a time (the decode
path, which tests/test_moe_ggml.py holds to llama.cpp). Models: tests/family_models.py's qwen3moe_8x2
and qwen3moe_32x8 and llama.cpp's Q4_K_M mix of them; groups in process (threads meeting in an fp32
allreduce, tests/test_layers_ggml_group.py), and one loopback group of real worker processes.
"""
from __future__ import annotations

import numpy as np
import pytest

from ggml_source import model_blocks
from test_layers_ggml_group import Group
from test_speculation import ScriptedDrafter
from test_speculation_group import run
from tpi.master import GroupOptions, start_group
from tpi.master.sampler import SamplingParams
from tpi.model.rows import Rows
from tpi.quant.ggml_lib import ggml_available

pytestmark = [pytest.mark.skipif(not ggml_available()[0], reason="ggml not loadable here"),
              pytest.mark.filterwarnings("ignore::ResourceWarning")]
ROWS = 9  # a verify pass of 8 drafts: an expert 8 rows name reaches the tiled kernel
HISTORY = 30
PLACED = [((1.0,), None), ((0.5, 0.5), "split"), ((0.5, 0.5), "whole")]


@pytest.fixture(scope="module")
def moe_file(family_gguf):
    pytest.importorskip("llama_cpp")  # the Q4_K_M mix is llama.cpp's
    return lambda name, ftype: family_gguf(name, q4_k_m=ftype == "Q4_K_M")


def group_forward(group: Group, ids: list[int], rows: Rows) -> np.ndarray:
    """Every rank's forward of ids at rows, the whole vocabulary's logits."""
    h = group.src.embed(ids)
    futures = [group.pool.submit(r.forward, h, rows, rows.outputs[0] > 1) for r in group.ranks]
    return np.concatenate([f.result() for f in futures], axis=-1)


@pytest.mark.parametrize("ratios,placement", PLACED, ids=["N1", "N2-split", "N2-whole"])
@pytest.mark.parametrize("ftype", ["F32", "Q4_K_M"])
@pytest.mark.parametrize("name", ["qwen3moe_8x2", "qwen3moe_32x8"])
def test_a_moe_verify_pass_gives_its_decode_steps_logits(name, ftype, ratios, placement, moe_file):
    group = Group(model_blocks(moe_file(name, ftype), ratios, placement))
    try:
        ids = [int(t) for t in np.random.default_rng(0).integers(3, group.src.config.vocab, HISTORY + ROWS)]
        group_forward(group, ids[:HISTORY], Rows.sequence(0, HISTORY))
        feed = ids[HISTORY - 1:HISTORY - 1 + ROWS]
        want = np.stack([group_forward(group, [t], Rows.sequence(HISTORY - 1 + i, 1))[-1] for i, t in enumerate(feed)])
        got = group_forward(group, feed, Rows.sequence(HISTORY - 1, ROWS, True, exact=True))
        np.testing.assert_array_equal(got, want, f"{name} {ftype} N={len(ratios)} {placement}")
    finally:
        group.pool.shutdown()


def assert_speculation_keeps_the_tokens(engine) -> None:
    """An engine's exact pass (Step EXACT_ROWS on every rank) gives its decode steps' logits; greedy and
    seeded sampling: prompt lookup, and a drafter of the plain run's own tokens with every third one
    wrong (verify passes keep some drafts and reject one), give plain decoding's tokens."""
    ids = [int(t) for t in np.random.default_rng(0).integers(3, engine.cfg.vocab, HISTORY + ROWS)]
    feed = ids[HISTORY - 1:HISTORY - 1 + ROWS]
    engine.reset()
    engine.prefill(ids[:HISTORY])
    want = np.stack([engine.forward([t], HISTORY - 1 + i)[-1] for i, t in enumerate(feed)])
    engine.truncate(HISTORY)
    np.testing.assert_array_equal(engine.forward(feed, HISTORY - 1, all_positions=True, exact=True), want)
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, engine.cfg.vocab, 40)]
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=5)):
        plain = run(engine, prompt, params)
        assert run(engine, prompt, params, mode="lookup").tokens == plain.tokens, params
        spec = run(engine, prompt, params, ScriptedDrafter(prompt, plain.tokens), mode="lookup")
        assert spec.tokens == plain.tokens, params
        stats = spec.speculation
        assert 0 < stats["spec_accepted"] < stats["spec_drafted"] and stats["tokens_per_forward"] > 1.5, stats


@pytest.mark.parametrize("ftype", ["F32", "Q4_K_M"])
def test_one_device_moe_speculation_gives_plain_tokens(ftype, moe_file, tmp_path):
    group = start_group(GroupOptions(model=str(moe_file("qwen3moe_32x8", ftype)), context=256, threads=2,
                                     backend="ggml", config_dir=tmp_path / "c", cache_dir=tmp_path / "k"))
    try:
        assert_speculation_keeps_the_tokens(group.engine)
    finally:
        group.close()


@pytest.mark.parametrize("placement", ["split", "whole"])
def test_a_moe_group_of_worker_processes_speculates_plain_tokens(placement, moe_file, tmp_path):
    group = start_group(GroupOptions(model=str(moe_file("qwen3moe_32x8", "Q4_K_M")), local_workers=1,
                                     host="127.0.0.1", ratios=(0.5, 0.5), experts=placement, threads=1,
                                     backend="ggml", worker_backend="ggml", context=256,
                                     config_dir=tmp_path / "c", cache_dir=tmp_path / "k", join_timeout_s=180))
    try:
        assert group.engine.comm.world == 2
        assert_speculation_keeps_the_tokens(group.engine)
    finally:
        group.close()
