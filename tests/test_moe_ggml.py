"""Qwen3-MoE (qwen3moe) in process: one device against llama.cpp itself, groups of 2 and 3 against one
device with both expert placements, the numpy fallback against llama.cpp, the torch refusal.

Models: tests/family_models.py's tiny qwen3moe files (8 experts top 2; 32 experts top 8), F32 and
llama.cpp's own Q4_K_M mix (Q4_K gate / up, Q6_K down; the router stays F32 as llama.cpp keeps it).
- One device: the MoE graph is llama.cpp's build_moe_ffn op for op (router in F32, soft_max,
  argsort_top_k, renormalised weights, mul_mat_id per expert tensor, slots added in order), so the
  logits are llama.cpp's bit for bit; the issue's bars (last-token correlation >= 0.9999, 32 greedy
  tokens) are asserted too. Comparing with llama.cpp rather than an fp32 forward keeps router near-ties
  out of the way: both engines route on the same rounded numbers.
- Groups (threads meeting in an fp32 allreduce, as the star does): "split" gives every rank every
  expert at a slice of its columns, "whole" gives whole experts, so a rank runs the router and then
  only the chosen experts it holds. F32 files: the same 32 tokens as one device. Q4_K_M: a column cut
  that splits a 256-element block is re-quantized to Q8_0 and ggml re-rounds partial sums' activations
  (tests/test_layers_ggml_group.py), so tokens are compared teacher-forced where one device's choice is
  clear of the drift.
"""
from __future__ import annotations

import numpy as np
import pytest

from ggml_source import model_blocks
from test_family_engines import CONTEXT, LlamaCpp, chat_ids, corr, greedy, layers_class, one_device, tpi_greedy
from test_family_engines import single  # noqa: F401 (the fixture: one device's rows and tokens per backend)
from test_layers_ggml_group import Group, assert_single_device_output
from tpi.model.blocks import mlp_key
from tpi.quant.ggml_lib import ggml_available

pytestmark = pytest.mark.skipif(not ggml_available()[0], reason="ggml not loadable here")
llama_cpp = pytest.importorskip("llama_cpp")

MODELS = ("qwen3moe_8x2", "qwen3moe_32x8")
MIN_CORRELATION = 0.9999
RATIOS = ((0.5, 0.5), (0.5, 0.25, 0.25))


@pytest.mark.parametrize("q4_k_m", [False, True], ids=["F32", "Q4_K_M"])
@pytest.mark.parametrize("name", MODELS)
def test_one_device_moe_is_llama_cpp_bit_for_bit(name, q4_k_m, family_gguf):
    path = family_gguf(name, q4_k_m=q4_k_m)
    src, prompt = model_blocks(path), chat_ids(path)
    if q4_k_m:
        mlp = src.blocks[0][mlp_key(0)]
        assert mlp["wgate_exps"].fmt == "ggml:Q4_K" and mlp["router"].fmt == "f32"
    ref = LlamaCpp(path, flash=True)
    theirs = greedy(lambda ids, start: ref.eval(ids), prompt)
    ours = tpi_greedy(one_device(src, "ggml"), src, prompt)
    assert corr(ours[0][0], theirs[0][0]) >= MIN_CORRELATION
    assert ours[1] == theirs[1]
    assert np.array_equal(ours[0], theirs[0])  # the same ops in the same order: the same bits


@pytest.mark.parametrize("name", MODELS)
def test_numpy_moe_follows_llama_cpp_on_f32(name, family_gguf):
    path = family_gguf(name)
    src, prompt = model_blocks(path), chat_ids(path)
    ref = LlamaCpp(path, flash=False)
    theirs = greedy(lambda ids, start: ref.eval(ids), prompt)
    ours = tpi_greedy(one_device(src, "numpy"), src, prompt)
    assert min(corr(a, b) for a, b in zip(ours[0], theirs[0])) >= MIN_CORRELATION and ours[1] == theirs[1]


def placed_group(path, ratios, placement: str, backend: str = "ggml") -> Group:
    src = model_blocks(path, ratios, placement)
    held = [(s.experts, s.expert_ff) for s in src.shards]
    cfg = src.config
    if placement == "split":
        assert all(e == range(cfg.n_experts) for e, _ in held) and sum(len(f) for _, f in held) == cfg.expert_ff
    else:
        assert all(f == range(cfg.expert_ff) for _, f in held) and sum(len(e) for e, _ in held) == cfg.n_experts
    return Group(src, layers_class(backend), CONTEXT)


GROUPS = [(n, b, p, r) for n in MODELS for b in ("ggml", "numpy") for p in ("split", "whole") for r in RATIOS]


@pytest.mark.parametrize("name,backend,placement,ratios", GROUPS,
                         ids=[f"{n}-{b}-{p}-N{len(r)}" for n, b, p, r in GROUPS])
def test_an_f32_group_gives_one_devices_tokens(name, backend, placement, ratios, family_gguf, single):
    path = family_gguf(name)
    want_rows, want = single(path, backend)
    group = placed_group(path, ratios, placement, backend)
    rows, tokens = greedy(lambda ids, start: group.forward(ids, start)[-1], chat_ids(path))
    assert tokens == want and min(corr(a, b) for a, b in zip(rows, want_rows)) >= MIN_CORRELATION


Q4_GROUPS = [(p, r) for p in ("split", "whole") for r in RATIOS]


@pytest.mark.parametrize("placement,ratios", Q4_GROUPS, ids=[f"{p}-N{len(r)}" for p, r in Q4_GROUPS])
def test_a_q4_k_m_group_stays_within_ggml_group_tolerance(placement, ratios, family_gguf, single):
    """qwen3moe_8x2 (head_dim 128): wo splits on its blocks 2 ways, not 3; "split" cuts down_exps'
    256 columns off its Q6_K block (Q8_0). qwen3moe_32x8's 128-column wo cut (head_dim 32) drifts 6%
    of max|logit| through router near-ties (measured), past the bar: its groups are checked on F32."""
    path = family_gguf("qwen3moe_8x2", q4_k_m=True)
    want = single(path, "ggml")
    group, prompt = placed_group(path, ratios, placement), chat_ids(path)
    forced = greedy(lambda ids, start: group.forward(ids if start == 0 else [want[1][start - len(prompt)]],
                                                        start)[-1], prompt)
    assert_single_device_output(want, forced, f"qwen3moe_8x2 Q4_K_M {placement} N={len(ratios)}")


def test_whole_experts_on_two_ranks_cut_nothing_and_give_one_devices_tokens(family_gguf, single):
    """Whole experts and wo on its blocks: no re-quantized cut, so 32 free-running tokens are one device's."""
    path = family_gguf("qwen3moe_8x2", q4_k_m=True)
    want_rows, want = single(path, "ggml")
    group = placed_group(path, (0.5, 0.5), "whole")
    rows, tokens = greedy(lambda ids, start: group.forward(ids, start)[-1], chat_ids(path))
    assert tokens == want and min(corr(a, b) for a, b in zip(rows, want_rows)) >= MIN_CORRELATION


def test_torch_refuses_moe_with_one_clear_error(family_gguf):
    from tpi.errors import TpiError
    from tpi.model.backends import make_layers

    src = model_blocks(family_gguf("qwen3moe_8x2"))
    with pytest.raises(TpiError, match="torch backend does not run qwen3moe models .*use --backend ggml"):
        make_layers("torch", src.config, src.shards[0], CONTEXT, 1)
