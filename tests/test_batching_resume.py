"""Batched sequences survive a lost device (issues 16 + 17): a pause for every running sequence, not a failure.

In process (one device; the loss injected: a step fails with GroupError after the group swapped its
communicator from another thread, as the supervisor does once it recovers): three sequences share the steps of a
`--parallel 3` Batch, their prompts read in chunks of at most 128 rows, so not where a lone prefill
would cut them. After the pause every later step's logits must equal the undisturbed batch's, bit for
bit: the replay repeats each slot's steps by the lone replay's rule (tpi.master.resume.replay_steps).
SmolLM2 is Q4_1 + Q8_0, whose batched rows ggml rounds as lone ones (tests/test_rows.py), so the
replay's steps, which carry the slots side by side, may differ in composition from the undisturbed
ones. Replaying each slot's history in one plain step is checked to differ, so the test can fail.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from tpi.errors import GroupError
from tpi.formats import open_model
from tpi.master import EngineOptions, build_local_engine
from tpi.master import batch as batch_module
from tpi.master.batch import Batch, Running
from tpi.master.generate import SequenceState
from tpi.master.group import Group, Members
from tpi.master.resume import Resumer, replay_chunk
from tpi.master.sampler import SamplingParams

TEXT = ("The lighthouse keeper climbed the stairs every evening, counting the steps and listening to the sea "
        "against the rocks below, while the gulls circled the lamp and the ships passed far out in the dark. ")
PROMPT_TOKENS = (100, 90, 20)  # with a budget of 128: steps of 100 + 28, then 62 + 20 beside a decode row
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def engine(smollm2):
    engine = build_local_engine(EngineOptions(str(smollm2), context=512, threads=1, backend="ggml", slots=3))
    group = Group(engine, Members([], {}))  # a group of one: its state, reason and options serve the Resumer
    events: list = []
    engine.resume = Resumer(group, events.append, replay_chunk(open_model(str(smollm2))))
    yield engine, group, events
    engine.model.weights.close()


def run_batch(engine, group, fail_at=()) -> tuple[list[np.ndarray], list]:
    """Three greedy sequences through one Batch; the engine's step calls numbered in fail_at fail as a lost
    device's would. Returns the logits of every step that sampled, and each sequence's Generation."""
    engine.reset()
    ids = engine.tokenizer.encode(TEXT * 4, add_bos=True, special=True)
    batch, ends, seen, calls = Batch(engine, prefill_budget=128), {}, [], [0]
    for i, n in enumerate(PROMPT_TOKENS):
        seq = SequenceState.start(ids[:n], SamplingParams(temperature=0.0), NEW_TOKENS, engine.tokenizer,
                                  ignore_eos=True)
        batch.admit(Running(seq, lambda piece: None, lambda gen, err, i=i: ends.__setitem__(i, (gen, err)),
                            lambda: False))
    step = engine.step

    def step_or_lose_a_device(ids, rows):
        calls[0] += 1
        if calls[0] in fail_at:  # the supervisor's thread swaps in the re-formed group's communicator once
            # the failed step lets go of the engine (the swap empties every cache)
            threading.Thread(target=group.enter, args=("serving", "", engine.comm), daemon=True).start()
            raise GroupError(f"device w1 (rank 1) was lost at step call {calls[0]} (injected)")
        logits = step(ids, rows)
        if len(logits):  # replay steps and early prompt chunks return none
            seen.append(logits.copy())
        return logits

    engine.step = step_or_lose_a_device
    try:
        while batch.running:
            batch.step()
            if batch.pause is not None:
                batch.resume()
    finally:
        del engine.step
    assert all(err is None for _, err in ends.values()), ends
    return seen, [ends[i][0] for i in range(len(PROMPT_TOKENS))]


@pytest.fixture(scope="module")
def undisturbed(engine):
    engine, group, _ = engine
    return run_batch(engine, group)


@pytest.mark.parametrize("fail_at", [(2,), (12, 13)], ids=["in-prompt", "in-decode-and-again-in-its-replay"])
def test_a_paused_batch_replays_every_slot_to_the_undisturbed_bits(engine, undisturbed, fail_at):
    engine, group, events = engine
    want, want_gens = undisturbed
    assert all(len(g.tokens) == NEW_TOKENS for g in want_gens)
    got, gens = run_batch(engine, group, fail_at)
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(a, b, err_msg=f"sampling step {k} after a loss at step call(s) {fail_at}")
    for g, w in zip(gens, want_gens):
        assert g.tokens == w.tokens and g.text == w.text
        (pause,) = g.pauses  # a loss during the replay extends the one pause; its cause is the last loss
        assert pause["cause"] == f"device w1 (rank 1) was lost at step call {fail_at[-1]} (injected)"
        assert g.stats()["paused_s"] == pause["paused_s"] and g.stats()["pause_cause"] == pause["cause"]
    if fail_at == (2,):  # the first step read 100 + 28 prompt rows; the third prompt had not begun
        assert [g.pauses[0]["replayed_tokens"] for g in gens] == [100, 28, 0]
    assert [e.kind for e in events[-3:]] == ["resumed"] * 3


def test_replaying_each_slot_in_one_plain_step_would_not_give_the_same_bits(engine, undisturbed, monkeypatch):
    engine, group, _ = engine
    want, _ = undisturbed
    monkeypatch.setattr(batch_module, "replay_steps", lambda runs, chunk: [(0, sum(n for _, n in runs))] if runs else [])
    got, _ = run_batch(engine, group, (12,))
    assert len(got) == len(want) and any(not np.array_equal(a, b) for a, b in zip(got, want))
