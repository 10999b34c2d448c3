"""A tensor-parallel group of GgmlLayers computes what one device computes.

Each rank is a real Transformer over GgmlLayers on its own shard (uneven ratios; N = 4 puts a KV
group on several ranks, whose query heads then run as separate flash-attention runs); the ranks run
in threads and meet in an in-process allreduce (fp32 sum, as the star allreduce does). The
multi-process group over sockets is tests/test_group_parity.py.

Tolerance. ggml quantizes each matmul's activations to 8 bits per 32-element block, so a partial sum
that differs from one device's in the last float bit can move a block's scale and re-round every
value in it: the group drifts from one device by more than float noise, by as much as one device
(llama.cpp itself) drifts from an fp32 forward. Measured on SmolLM2 over 24 greedy steps: one
device vs fp32 min correlation 0.99802, max |diff| 4.3% of max |logit|; the 2-device group vs one
device 0.99848 and 4.4%. So greedy tokens must match wherever the single-device top-2 margin is clear
of twice the row's max |diff| (about half the steps), and in free-running decoding up to the first
near-tie, as in test_group_parity.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ggml_source import ModelBlocks, model_blocks
from tpi.model.transformer import ResidentWeights, Transformer
from tpi.quant.ggml_lib import ggml_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not ggml_available()[0], reason="ggml not loadable here")]

STEPS = 24
CONTEXT = 256
MIN_CORRELATION = 0.997
MAX_ABS_DIFF_FRACTION = 0.06


class _Hub:
    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[np.ndarray | None] = [None] * world


class ThreadComm:
    """An allreduce between ranks running in threads of this process: every rank sums in rank order."""

    def __init__(self, hub: _Hub, rank: int):
        self.hub, self.rank, self.world = hub, rank, len(hub.slots)

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        self.hub.slots[self.rank] = np.array(x, dtype=np.float32)
        self.hub.barrier.wait()
        total = self.hub.slots[0].copy()
        for part in self.hub.slots[1:]:
            total += part
        self.hub.barrier.wait()  # nobody overwrites a slot before every rank has summed
        return total

    def gather(self, x: np.ndarray) -> list[np.ndarray]:
        return [x]


class Group:
    """N ranks of GgmlLayers (or another layers class) on a GGUF, run in lockstep; forward returns the
    whole vocabulary."""

    def __init__(self, src: ModelBlocks, layers_class=None, context: int = CONTEXT):
        from tpi.model.layers_ggml import GgmlLayers

        self.src, cfg = src, src.config
        self.shards = src.shards
        hub = _Hub(len(self.shards))
        self.ranks = []
        for s, blocks in zip(self.shards, src.blocks):
            moe = {"experts": s.expert_share(cfg)} if cfg.is_moe else {}  # the rank's experts (placement)
            layers = (layers_class or GgmlLayers)(cfg, s.n_q_heads, s.q_to_local_kv, context, 1, **moe)
            weights = ResidentWeights({k: layers.to_runtime(b) for k, b in blocks.items()})
            self.ranks.append(Transformer(cfg, layers, weights, ThreadComm(hub, s.rank) if len(self.shards) > 1 else None))
        self.pool = ThreadPoolExecutor(len(self.shards))

    def forward(self, ids: list[int], start: int, all_positions: bool = False) -> np.ndarray:
        h = self.src.embed(ids)
        futures = [self.pool.submit(r.forward, h, start, all_positions) for r in self.ranks]
        return np.concatenate([f.result() for f in futures], axis=-1)

    def greedy(self, prompt: list[int], forced: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
        """(logits of the rows that chose each token, tokens); forced tokens are fed instead of its own."""
        rows, tokens = [self.forward(prompt, 0)[-1]], []
        pos = len(prompt)
        for i in range(STEPS):
            tokens.append(int(rows[-1].argmax()))
            rows.append(self.forward([forced[i] if forced else tokens[-1]], pos)[-1])
            pos += 1
        return np.stack(rows[:-1]), tokens


@pytest.fixture(scope="module")
def single():
    """path -> (logits rows, greedy tokens) of one device, computed once per model."""
    made = {}

    def get(path, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
        if path not in made:
            made[path] = Group(model_blocks(path)).greedy(prompt)
        return made[path]

    return get


SMOLLM2_PROMPT = [1, 504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282]  # "The capital of France is Paris..."
TINY_PROMPT = [1, 5, 17, 99, 200, 31, 7]


def assert_single_device_output(ref: tuple, got: tuple, label: str) -> int:
    """Check the tolerance and the teacher-forced tokens; returns the steps before the first near-tie."""
    (ref_rows, ref_tokens), (rows, tokens) = ref, got
    corr = min(float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ref_rows, rows))
    diff, scale = float(np.abs(rows - ref_rows).max()), float(np.abs(ref_rows).max())
    top2 = np.sort(ref_rows, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(rows - ref_rows).max(-1)
    print(f"{label}: min corr {corr:.6f}, max|diff| {diff / scale:.2%} of max|logit|, "
          f"{int(clear.sum())}/{len(rows)} choices clear of a near-tie")
    assert corr >= MIN_CORRELATION and diff <= MAX_ABS_DIFF_FRACTION * scale, label
    np.testing.assert_array_equal(rows.argmax(-1)[clear], ref_rows.argmax(-1)[clear], label)
    assert clear.sum() >= len(rows) // 3, f"{label}: too few clear choices to mean anything"
    return int(np.argmin(clear)) if not clear.all() else len(rows)


CASES = [(0.6, 0.4), (0.5, 0.3, 0.2), (0.4, 0.3, 0.2, 0.1)]


@pytest.mark.parametrize("ratios", CASES, ids=[f"N{len(r)}" for r in CASES])
def test_smollm2_group_gives_the_single_device_tokens(smollm2, single, ratios):
    ref = single(smollm2, SMOLLM2_PROMPT)
    group = Group(model_blocks(smollm2, ratios))
    # 9 query heads over 3 KV heads: every split here cuts a KV group, so some rank runs its
    # query heads as several flash-attention runs over KV heads that other ranks also hold
    assert any(len(r.layers.spec.segments) > 1 for r in group.ranks) or len(ratios) == 4
    assert sum(len(s.kv_heads) for s in group.shards) > 3
    same_until = assert_single_device_output(ref, group.greedy(SMOLLM2_PROMPT, forced=ref[1]), f"SmolLM2 {ratios}")
    assert group.greedy(SMOLLM2_PROMPT)[1][:same_until] == ref[1][:same_until]


@pytest.mark.parametrize("variant", ["tiny_qwen2_q8_0", "tiny_llama_q4_0", "tiny_qwen2_q4_0_tied"])
@pytest.mark.parametrize("ratios", [(0.5, 0.25, 0.25), (0.25,) * 4], ids=["N3", "N4"])
def test_tiny_groups_with_kv_heads_on_several_ranks(tiny_gguf, single, variant, ratios):
    path = tiny_gguf(variant)
    ref = single(path, TINY_PROMPT)
    group = Group(model_blocks(path, ratios))
    assert sum(len(s.kv_heads) for s in group.shards) > group.src.config.n_kv_heads  # KV heads replicated
    same_until = assert_single_device_output(ref, group.greedy(TINY_PROMPT, forced=ref[1]), f"{variant} {ratios}")
    assert group.greedy(TINY_PROMPT)[1][:same_until] == ref[1][:same_until]


@pytest.fixture(scope="module")
def tiny_q4_k_m(tmp_path_factory):
    """A tiny qwen2 (hidden 256: real Q4_K and Q6_K) quantized by llama.cpp to Q4_K_M."""
    from ggml_source import llama_quantize
    from model_factory import write_tiny_gguf

    tmp = tmp_path_factory.mktemp("kquant_group")
    f16 = write_tiny_gguf(tmp / "f16.gguf", arch="qwen2", hidden=256, intermediate=512, n_heads=4, n_kv_heads=2,
                          weight_type="F16", seed=7)
    return llama_quantize(f16, tmp / "q4_k_m.gguf", "Q4_K_M")


@pytest.mark.parametrize("ratios", [(0.5, 0.5), (0.5, 0.25, 0.25), (0.25,) * 4], ids=["N2", "N3", "N4"])
def test_a_k_quant_mix_group_gives_the_single_device_tokens(tiny_q4_k_m, single, ratios):
    """Q4_K / Q6_K columns are cut on 256-element blocks, or re-quantized to Q8_0 where they cannot be."""
    ref = single(tiny_q4_k_m, TINY_PROMPT)
    src = model_blocks(tiny_q4_k_m, ratios)
    fmts = {w.fmt for blocks in src.blocks for b in blocks.values() for w in b.values() if hasattr(w, "fmt")}
    assert {"ggml:Q4_K", "ggml:Q6_K"} <= fmts
    if len(ratios) > 2:  # wo's 256 columns cannot fall on 256-element blocks 3 or 4 ways
        assert "ggml:Q8_0" in {b["wo"].fmt for blocks in src.blocks for k, b in blocks.items() if k.endswith("attn")}
    group = Group(src)
    same_until = assert_single_device_output(ref, group.greedy(TINY_PROMPT, forced=ref[1]), f"Q4_K_M {ratios}")
    assert group.greedy(TINY_PROMPT)[1][:same_until] == ref[1][:same_until]
