"""A resumed answer is bit-identical past position 512 and on every weight type (issue 16's promise).

In process, 2 threads (so ggml's split flash attention of a one-row step over 512+ cache rows is live):
greedy-decode a sequence past position 600 through a Resumer; then run it again with a device loss
injected (the group's communicator swapped from another thread, then the step fails with GroupError, as
tests/test_batching_resume.py does) at a decode step past position 512. Every decode step after the
loss must give the undisturbed run's logits bit for bit. Q4_0 is repacked (any row count keeps one-row
bits); F16 takes tinyBLAS from 2 rows; Q4_K_M mixes repacked Q4_K (gemm from 4 rows) and Q6_K (tiled
from 8). On each, decoded rows replayed in plain 63-row steps are checked to differ, so the test can
fail. A paused Batch (two slots, Q4_0) is held to the same, its slots near positions 480 and 590 when
the device is lost (a one-row step splits its attention from position 256 on: n_kv 512).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from test_batching_resume import sampled_logits

from tpi.errors import GroupError
from tpi.formats import open_model
from tpi.master import EngineOptions, build_local_engine
from tpi.master import resume as resume_module
from tpi.master.batch import Batch, Running
from tpi.master.generate import SequenceState
from tpi.master.group import Group, Members
from tpi.master.resume import Resumer, replay_chunk
from tpi.master.sampler import SamplingParams

pytestmark = pytest.mark.slow  # 2 ggml threads: ~1 s a test on an idle machine, 13-25 s on a busy one

PROMPT = [1 + (7 * i) % 300 for i in range(20)]
NEW_TOKENS = 620  # the last decode step attends over 640 cache rows: split across threads, 3rd bucket
LOSS_AT = (530, 595)  # decode steps (token counts) at which a device is lost


def decode_steps(engine, lose_at=()) -> tuple[dict[int, np.ndarray], object]:
    """A greedy sequence of NEW_TOKENS through a Resumer, the decode steps numbered in lose_at failing.
    Returns the logits of every one-row forward by position (the last kept: after a loss, the resumed
    run's) and the Generation."""
    group = Group(engine, Members([], {}))  # a group of one: its state serves the Resumer
    resumer = Resumer(group, lambda event: None, replay_chunk(open_model(engine.path)))
    forward, seen, decodes = engine.forward, {}, [0]
    lose_at = list(lose_at)

    def forward_or_lose_a_device(ids, start, all_positions=False, exact=False):
        if len(ids) == 1 and start >= len(PROMPT):
            decodes[0] += 1
            if lose_at and decodes[0] == lose_at[0]:
                lose_at.pop(0)  # the supervisor swaps the re-formed group's communicator in (emptying the caches)
                threading.Thread(target=group.enter, args=("serving", "", engine.comm), daemon=True).start()
                raise GroupError(f"device w1 was lost at decode step {decodes[0]} (injected)")
        logits = forward(ids, start, all_positions, exact)
        if len(ids) == 1:
            seen[start] = logits.copy()
        return logits

    engine.forward = forward_or_lose_a_device
    try:
        seq = SequenceState.start(PROMPT, SamplingParams(temperature=0.0), NEW_TOKENS, engine.tokenizer,
                                  ignore_eos=True)
        engine.reset()
        out = resumer.run(engine, seq, lambda piece: None)
    finally:
        del engine.forward
    return seen, out


def plain_steps(runs, _chunk, chunk=63):
    """The replay rule before exact steps: the prompt as read, the decoded rows in plain steps of 63 rows."""
    prompt = [(s, n, False) for s, n in runs if n > 1]
    rest = [s for s, n in runs if n == 1]
    return prompt + [(s, min(chunk, rest[-1] + 1 - s), False) for s in rest[::chunk]] if rest else prompt


@pytest.mark.parametrize("variant", ["tiny_llama_q4_0", "tiny_llama_f16", "Q4_K_M"])
def test_resumed_decode_steps_past_512_keep_their_bits(variant, tiny_gguf, kquant_gguf, monkeypatch):
    path = kquant_gguf(variant) if variant == "Q4_K_M" else tiny_gguf(variant, context=1024)  # Q4_K_M: 512, run at 1024
    engine = build_local_engine(EngineOptions(str(path), context=1024, threads=2, backend="ggml"))
    engine.path = str(path)
    try:
        undisturbed, plain = decode_steps(engine)
        resumed, out = decode_steps(engine, LOSS_AT)
        assert len(out.pauses) == len(LOSS_AT) and out.tokens == plain.tokens
        first = len(PROMPT) + LOSS_AT[0] - 1  # the first decode step after the first loss
        for pos in range(first, len(PROMPT) + NEW_TOKENS - 1):
            np.testing.assert_array_equal(resumed[pos], undisturbed[pos], err_msg=f"decode step at position {pos}")
        monkeypatch.setattr(resume_module, "replay_steps", plain_steps)  # the rule before: not the same bits
        seq = SequenceState.start(PROMPT, SamplingParams(temperature=0.0), NEW_TOKENS, engine.tokenizer)
        seq.out.tokens.extend(plain.tokens[:LOSS_AT[0]])
        resume_module.replay(engine, seq, 63)
        assert not np.array_equal(engine.forward([seq.tokens[-1]], first)[-1:], undisturbed[first])
    finally:
        engine.model.weights.close()


def batch_steps(engine, group, fail_at=()) -> list[np.ndarray]:
    """Two greedy sequences (prompts of 150 and 40 tokens, read in chunks of at most 128 rows beside the
    other's rows) decoding 470 tokens each in one Batch; the logits of every step that sampled."""
    engine.reset()
    batch, ends = Batch(engine, prefill_budget=128), {}
    for i, n in enumerate((150, 40)):
        seq = SequenceState.start((PROMPT * 8)[:n], SamplingParams(temperature=0.0), 470, engine.tokenizer,
                                  ignore_eos=True)
        batch.admit(Running(seq, lambda piece: None, lambda gen, err, i=i: ends.__setitem__(i, err), lambda: False))
    with sampled_logits(engine, group, fail_at) as seen:
        while batch.running:
            batch.step()
            if batch.pause is not None:
                batch.resume()
    assert ends == {0: None, 1: None}
    return seen


def test_a_paused_batch_past_512_replays_to_the_undisturbed_bits(tiny_gguf):
    path = tiny_gguf("tiny_llama_q4_0", context=1024)  # Q4_0: batched rows keep lone rows' bits
    engine = build_local_engine(EngineOptions(str(path), context=1024, threads=2, backend="ggml", slots=2))
    group = Group(engine, Members([], {}))
    engine.resume = Resumer(group, lambda event: None, replay_chunk(open_model(str(path))))
    try:
        want = batch_steps(engine, group)
        got = batch_steps(engine, group, (440,))  # slot 0 at position ~587, slot 1 at ~477
        assert len(got) == len(want)
        for k, (a, b) in enumerate(zip(got, want)):
            np.testing.assert_array_equal(a, b, err_msg=f"sampling step {k}")
    finally:
        engine.model.weights.close()
