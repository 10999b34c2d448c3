"""One forward step carries rows of several sequences, each in its own KV slot (tpi.model.rows).

The reference is the same model running each sequence alone, with the same chunks of its prompt.

The bit-identity rule for ggml: a row's attention is its own flash-attention call over its own slot
with the rows and n_kv it has alone (so even the one-row split of KV across threads at n_kv >= 512 is
the same), and the elementwise ops are per row, so a row differs from its lone twin only through the
matmuls, whose kernel ggml (0.25.3) picks by the row count: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights
round a row of a batched matmul exactly as a lone row at every count; F32/F16/BF16/IQ4_NL (sgemm from
2 rows), unrepacked K-quants (tiled from 8 rows) and repacked Q4_K (gemm per 4 rows) round differently,
so on those models a batched row matches its lone twin to float tolerance and greedy tokens differ
only at near-ties (the serving tests state that rule). The models here (SmolLM2: Q4_1 + Q8_0; tiny
Q4_0) are of the first kind: every logit must be equal, bit for bit. numpy's float32 BLAS may round a
batched row differently: within 1e-5.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ggml_source import model_blocks
from test_layers_ggml_group import SMOLLM2_PROMPT, ThreadComm, _Hub
from tpi.errors import ShapeError
from tpi.model.rows import Rows
from tpi.model.transformer import ResidentWeights, Transformer
from tpi.quant.ggml_lib import ggml_available

CONTEXT = 512
CHUNK = 16  # prompt rows per step; a prompt's chunks are the same alone and batched
PROMPTS = [SMOLLM2_PROMPT, [1, 504, 3575, 282, 1792, 314, 17, 99, 200, 31, 7, 504, 3575, 282, 4649, 314,
                            7042, 30, 378, 3575, 282, 1792, 314, 5, 17, 9, 12],
           [1, 1792, 314, 17, 5]]
DECODE = 6

ggml_only = pytest.mark.skipif(not ggml_available()[0], reason="ggml not loadable here")


class Ranks:
    """Every rank's Transformer of a model cut `ratios` ways, stepped together (threads + allreduce)."""

    def __init__(self, path, backend: str, ratios=(1.0,), slots: int = 1, whole_graph: bool = True):
        src = self.src = model_blocks(path, ratios)
        cfg = src.config
        hub = _Hub(len(src.shards))
        self.ranks = []
        for shard, blocks in zip(src.shards, src.blocks):
            if backend == "ggml":
                from tpi.model.layers_ggml import GgmlLayers

                layers = GgmlLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, CONTEXT, 1, whole_graph=whole_graph,
                                    slots=slots)
            else:
                from tpi.model.layers_numpy import NumpyLayers

                layers = NumpyLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, CONTEXT, 1, slots=slots)
            comm = ThreadComm(hub, shard.rank) if len(src.shards) > 1 else None
            weights = ResidentWeights({k: layers.to_runtime(b) for k, b in blocks.items()})
            self.ranks.append(Transformer(cfg, layers, weights, comm))
        self.pool = ThreadPoolExecutor(len(self.ranks))

    def step(self, ids: list[int], rows: Rows) -> np.ndarray:
        h = self.src.embed(ids)
        futures = [self.pool.submit(r.forward, h, rows) for r in self.ranks]
        return np.concatenate([f.result() for f in futures], axis=-1)

    def truncate(self, slot: int, keep: int) -> None:
        for r in self.ranks:
            r.truncate(slot, keep)


def alone(ranks: Ranks, prompt: list[int], tokens: list[int] | None = None, slot: int = 0) -> tuple[np.ndarray, list[int]]:
    """(logits of the prompt's last row and of each decode row, tokens fed): one sequence on its own."""
    for i in range(0, len(prompt), CHUNK):
        chunk = prompt[i:i + CHUNK]
        out = ranks.step(chunk, Rows((slot,), (i,), (len(chunk),), (1 if i + CHUNK >= len(prompt) else 0,)))
    rows, fed = [out[-1]], []
    for n in range(DECODE):
        tok = tokens[n] if tokens else int(rows[-1].argmax())
        fed.append(tok)
        rows.append(ranks.step([tok], Rows((slot,), (len(prompt) + n,), (1,), (1,)))[-1])
    return np.stack(rows), fed


def batched(ranks: Ranks, prompts: list[list[int]], slots: list[int]) -> list[tuple[np.ndarray, list[int]]]:
    """Every prompt in its slot, the later ones joining while the earlier decode: each step carries the
    decode row of every running sequence plus the next chunk of one waiting prompt (greedy)."""
    state = [{"slot": s, "prompt": p, "done": 0, "logits": [], "fed": []} for s, p in zip(slots, prompts)]
    while any(len(st["logits"]) < DECODE + 1 for st in state):
        ids, runs = [], []
        for st in state:  # decode rows first
            if st["done"] == len(st["prompt"]) and len(st["logits"]) < DECODE + 1:
                tok = int(st["logits"][-1].argmax())
                st["fed"].append(tok)
                ids.append(tok)
                runs.append((st, st["done"] + len(st["fed"]) - 1, 1, 1))
        waiting = [st for st in state if st["done"] < len(st["prompt"])]
        if waiting:  # one prompt chunk per step, its chunks as when it runs alone
            st = waiting[0]
            chunk = st["prompt"][st["done"]:st["done"] + CHUNK]
            last = st["done"] + len(chunk) == len(st["prompt"])
            ids += chunk
            runs.append((st, st["done"], len(chunk), int(last)))
        rows = Rows(*(tuple(r[i] if i else r[0]["slot"] for r in runs) for i in range(4)))
        out = ranks.step(ids, rows)
        at = 0
        for st, _, count, n_out in runs:
            if n_out:
                st["logits"].append(out[at])
                at += 1
            if st["done"] < len(st["prompt"]):
                st["done"] += count
    return [(np.stack(st["logits"]), st["fed"]) for st in state]


def check_same(got, want, exact: bool) -> None:
    (rows, fed), (ref_rows, ref_fed) = got, want
    if exact:
        np.testing.assert_array_equal(rows, ref_rows)
    else:
        np.testing.assert_allclose(rows, ref_rows, rtol=1e-5, atol=1e-5 * np.abs(ref_rows).max())
    assert fed == ref_fed


@ggml_only
@pytest.mark.parametrize("whole_graph", [True, False], ids=["whole", "blocks"])
def test_rows_of_three_slots_give_each_sequence_its_lone_logits_bit_for_bit(smollm2, whole_graph):
    refs = [alone(Ranks(smollm2, "ggml", whole_graph=whole_graph), p) for p in PROMPTS]
    ranks = Ranks(smollm2, "ggml", slots=3, whole_graph=whole_graph)
    for got, want in zip(batched(ranks, PROMPTS, [2, 0, 1]), refs):
        check_same(got, want, exact=True)


@ggml_only
@pytest.mark.slow
def test_a_two_rank_group_batches_rows_bit_for_bit(smollm2):
    refs = [alone(Ranks(smollm2, "ggml", (0.6, 0.4)), p) for p in PROMPTS[:2]]
    ranks = Ranks(smollm2, "ggml", (0.6, 0.4), slots=2)
    for got, want in zip(batched(ranks, PROMPTS[:2], [1, 0]), refs):
        check_same(got, want, exact=True)


def test_numpy_rows_of_two_slots_match_their_lone_runs(tiny_llama_q4_0):
    prompts = [[1, 5, 17, 99, 200, 31, 7], [1, 9, 8, 7, 6, 5, 4, 3, 2, 1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39]]
    refs = [alone(Ranks(tiny_llama_q4_0, "numpy"), p) for p in prompts]
    ranks = Ranks(tiny_llama_q4_0, "numpy", slots=2)
    for got, want in zip(batched(ranks, prompts, [1, 0]), refs):
        check_same(got, want, exact=False)


@pytest.mark.parametrize("backend", [pytest.param("ggml", marks=ggml_only), "numpy"])
def test_truncate_then_recompute_equals_never_having_computed(tiny_llama_q4_0, backend):
    prompt, other = [1, 5, 17, 99, 200, 31, 7], [1, 9, 8, 7, 6, 5]
    ranks = Ranks(tiny_llama_q4_0, backend, slots=2)
    first = alone(ranks, prompt, slot=1)  # prompt + 6 decode rows in slot 1
    alone(ranks, other, slot=0)  # slot 0 busy meanwhile: untouched by slot 1's truncation
    keep = len(prompt) + 2
    ranks.truncate(1, keep)
    retry = [40, 41, 42]
    # a speculative-style check: 3 rows at once, every row's logits, after the kept positions
    redo = ranks.step(retry, Rows((1,), (keep,), (3,), (3,)))
    fresh = Ranks(tiny_llama_q4_0, backend)
    fresh.step(prompt, Rows.sequence(0, len(prompt)))
    for i, tok in enumerate(first[1][:2]):  # as slot 1 computed them: one row per step
        fresh.step([tok], Rows.sequence(len(prompt) + i, 1))
    want = fresh.step(retry, Rows.sequence(keep, 3, all_logits=True))
    if backend == "ggml":
        np.testing.assert_array_equal(redo, want)
    else:
        np.testing.assert_allclose(redo, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # slot 0 was left alone: rewriting its last row gives what a lone run of it gives there
    again = alone(Ranks(tiny_llama_q4_0, backend), other)
    nxt = ranks.step([again[1][-1]], Rows((0,), (len(other) + DECODE - 1,), (1,), (1,)))
    np.testing.assert_allclose(nxt[-1], again[0][-1], rtol=1e-5 if backend == "numpy" else 0, atol=0)


def test_a_step_that_would_read_keys_never_computed_is_refused(tiny_llama_q4_0):
    ranks = Ranks(tiny_llama_q4_0, "numpy", slots=2)
    ranks.step([1, 5, 17], Rows.sequence(0, 3, slot=1))
    with pytest.raises(ShapeError, match="never computed"):
        ranks.ranks[0].forward(ranks.src.embed([9, 9]), Rows((0, 1), (0, 4), (1, 1), (1, 1)))  # slot 1 holds 3
    with pytest.raises(ShapeError, match="slot 2 does not exist"):
        ranks.ranks[0].forward(ranks.src.embed([9]), Rows.sequence(0, 1, slot=2))
    with pytest.raises(ShapeError, match="outside the KV cache"):
        ranks.ranks[0].forward(ranks.src.embed([9]), Rows.sequence(CONTEXT, 1, slot=0))
    ranks.truncate(1, 1)
    with pytest.raises(ShapeError, match="never computed"):
        ranks.ranks[0].forward(ranks.src.embed([9]), Rows.sequence(2, 1, slot=1))


def test_rows_list_each_slot_once_and_their_logits_rows():
    rows = Rows((2, 0), (7, 0), (1, 3), (1, 0))
    assert rows.tokens == 4 and rows.n_outputs == 1
    assert rows.positions.tolist() == [7, 0, 1, 2] and rows.row_slots.tolist() == [2, 0, 0, 0]
    assert rows.output_rows.tolist() == [0]
    assert Rows.sequence(5, 3, all_logits=True).output_rows.tolist() == [0, 1, 2]
    with pytest.raises(ShapeError, match="twice"):
        Rows((1, 1), (0, 3), (1, 1), (1, 1))
    with pytest.raises(ShapeError, match="logits rows"):
        Rows((0,), (0,), (2,), (3,))
