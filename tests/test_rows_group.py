"""Rows of several KV slots in one step through a real 2-device group (a `tpi join` process, CURVE on).

The Step carries the runs of rows on the wire, the worker keeps a KV region per slot, a Truncate
reaches it; each sequence's logits must be what the same group gives that sequence alone, bit for
bit (the rule in tests/test_rows.py: Q4_0 matmuls round a batched row as a lone one, the f32 star
allreduce sums each element alone).
"""
from __future__ import annotations

import numpy as np
import pytest

from test_rows import CHUNK, DECODE
from tpi.errors import ShapeError
from tpi.master.options import GroupOptions
from tpi.master.setup import start_group
from tpi.model.rows import Rows

pytestmark = pytest.mark.slow

PROMPTS = [[1, 5, 17, 99, 200, 31, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [1, 9, 8, 7, 6, 5]]


class EngineSteps:
    """An Engine driven step by step, the way tests/test_rows.py drives its ranks."""

    def __init__(self, engine):
        self.engine = engine

    def step(self, ids, rows):
        return self.engine.step(ids, rows)

    def truncate(self, slot, keep):
        self.engine.truncate(keep, slot)


@pytest.fixture(scope="module")
def group(tiny_gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rows_group")
    g = start_group(GroupOptions(model=str(tiny_gguf("tiny_llama_q4_0")), local_workers=1, slots=2, context=256,
                                 backend="ggml", worker_backend="ggml", insecure=True, wire_dtype="f32",
                                 config_dir=tmp / "config", cache_dir=tmp / "cache"))
    yield g
    g.close()


def test_a_group_step_of_two_slots_gives_each_its_lone_logits(group):
    from test_rows import alone, batched

    steps = EngineSteps(group.engine)
    refs = []
    for prompt in PROMPTS:
        refs.append(alone(steps, prompt, slot=0))
        steps.truncate(0, 0)
    got = batched(steps, PROMPTS, [1, 0])
    for (rows, fed), (ref_rows, ref_fed) in zip(got, refs):
        np.testing.assert_array_equal(rows, ref_rows)
        assert fed == ref_fed
    assert group.engine.model.kv.lengths == [len(PROMPTS[1]) + DECODE, len(PROMPTS[0]) + DECODE]


def test_truncate_reaches_the_worker_and_a_rewritten_tail_matches(group):
    steps = EngineSteps(group.engine)
    for slot in (0, 1):
        steps.truncate(slot, 0)
    prompt = PROMPTS[0]
    first = steps.step(prompt[:CHUNK], Rows.sequence(0, CHUNK, slot=1))
    rest = steps.step(prompt[CHUNK:], Rows.sequence(CHUNK, len(prompt) - CHUNK, all_logits=True, slot=1))
    steps.truncate(1, CHUNK)
    again = steps.step(prompt[CHUNK:], Rows.sequence(CHUNK, len(prompt) - CHUNK, all_logits=True, slot=1))
    np.testing.assert_array_equal(again, rest)
    assert first.shape[0] == 1
    steps.truncate(1, 3)
    with pytest.raises(ShapeError, match="never computed"):  # the master refuses before any worker sees it
        steps.step([5], Rows.sequence(5, 1, slot=1))
    out = steps.step(prompt[3:5], Rows.sequence(3, 2, slot=1))  # the group still serves
    assert out.shape == (1, group.engine.cfg.vocab) and np.isfinite(out).all()
