"""Batched sequences survive a lost device (issues 16 + 17): a pause for every running sequence, not a failure.

In process (one device; the loss injected: a step fails with GroupError after the group swapped its
communicator from another thread, as the supervisor does once it recovers): three sequences share the steps of a
`--parallel 3` Batch, their prompts read in chunks of at most 128 rows, so not where a lone prefill
would cut them. After the pause every later step's logits must equal the undisturbed batch's, bit for
bit: the replay repeats each slot's steps by the lone replay's rule (tpi.master.resume.replay_steps).
SmolLM2 is Q4_1 + Q8_0, whose batched rows ggml rounds as lone ones (tests/test_rows.py), so the
replay's steps, which carry the slots side by side, may differ in composition from the undisturbed
ones. Replaying each slot's history in one plain step is checked to differ, so the test can fail.

With lookup speculation (issue 18) the same batch is lost in a step carrying a verify run, then right after a
rollback or in the rollback's own broadcast: each answer and every logits row it computed at a sampled position
must be the plain undisturbed batch's.
"""
from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_batching import chat_ids
from test_reliability_support import device_profile, free_port_pair, join
from test_resume_local import Stream, kill_worker, timeline

from tpi.errors import GroupError, GroupUnavailableError
from tpi.formats import open_model
from tpi.master import EngineOptions, GroupOptions, build_local_engine, start_group
from tpi.master import batch as batch_module
from tpi.master.batch import Batch, Running
from tpi.master.generate import SequenceState
from tpi.master.group import Group, Members
from tpi.master.resume import Resumer, replay_chunk
from tpi.master.sampler import SamplingParams
from tpi.master.speculation import SpeculationOptions, build_speculator
from tpi.serve.api import create_app
from tpi.serve.service import GenerationService
from tpi.transport.keeper import LinkSettings
from tpi.transport.security import master_token

TEXT = ("The lighthouse keeper climbed the stairs every evening, counting the steps and listening to the sea "
        "against the rocks below, while the gulls circled the lamp and the ships passed far out in the dark. ")
PROMPT_TOKENS = (100, 90, 20)  # with a budget of 128: steps of 100 + 28, then 62 + 20 beside a decode row
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def engine(smollm2):
    engine = build_local_engine(EngineOptions(str(smollm2), context=512, threads=1, backend="ggml", slots=3))
    group = Group(engine, Members([], {}))  # a group of one: its state, reason and options serve the Resumer
    events: list = []
    engine.resume = Resumer(group, events.append, replay_chunk(open_model(str(smollm2))))
    yield engine, group, events
    engine.model.weights.close()


@contextlib.contextmanager
def sampled_logits(engine, group=None, fail_at=()):
    """Yields the logits of every step engine.step runs that samples (early prompt chunks and plain replay
    steps return none; exact replay steps are left out); the calls numbered in fail_at fail as a lost
    device's would."""
    step, seen, calls = engine.step, [], [0]

    def step_or_lose_a_device(ids, rows):
        calls[0] += 1
        if calls[0] in fail_at:  # the supervisor's thread swaps in the re-formed group's communicator once
            # the failed step lets go of the engine (the swap empties every cache)
            threading.Thread(target=group.enter, args=("serving", "", engine.comm), daemon=True).start()
            raise GroupError(f"device w1 (rank 1) was lost at step call {calls[0]} (injected)")
        logits = step(ids, rows)
        if len(logits) and not rows.exact:  # no speculation here: an exact step is a replay's, which samples nothing
            seen.append(logits.copy())
        return logits

    engine.step = step_or_lose_a_device
    try:
        yield seen
    finally:
        del engine.step


def run_batch(engine, group, fail_at=()) -> tuple[list[np.ndarray], list]:
    """Three greedy sequences through one Batch (see sampled_logits for fail_at). Returns the logits of every
    step that sampled, and each sequence's Generation."""
    engine.reset()
    ids = engine.tokenizer.encode(TEXT * 4, add_bos=True, special=True)
    batch, ends = Batch(engine, prefill_budget=128), {}
    for i, n in enumerate(PROMPT_TOKENS):
        seq = SequenceState.start(ids[:n], SamplingParams(temperature=0.0), NEW_TOKENS, engine.tokenizer,
                                  ignore_eos=True)
        batch.admit(Running(seq, lambda piece: None, lambda gen, err, i=i: ends.__setitem__(i, (gen, err)),
                            lambda: False))
    with sampled_logits(engine, group, fail_at) as seen:
        while batch.running:
            batch.step()
            if batch.pause is not None:
                batch.resume()
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
    monkeypatch.setattr(batch_module, "replay_steps",
                        lambda runs, chunk: [(0, sum(n for _, n in runs), False)] if runs else [])  # (start, rows, exact)
    got, _ = run_batch(engine, group, (12,))
    assert len(got) == len(want) and any(not np.array_equal(a, b) for a, b in zip(got, want))


# ---- real processes: a 2-device group serving --parallel 3, its worker killed -9 mid-stream ----

QUESTIONS = ("Tell me everything about lighthouses, their keepers, their lamps, the storms they saw and the "
             "ships they saved along the northern coasts, in as much detail as you can.",
             "Describe the sea at night from the top of a lighthouse, the lamp turning and the waves below.",
             "Name three colours.")
ANSWER_TOKENS = 48
KILL_AT = 16  # pieces of the first answer streamed before the kill
HANG_S = 60.0  # a hang guard only, not a speed claim


def group_options(tiny: str, tmp, **over) -> GroupOptions:
    return GroupOptions(**{**dict(model=tiny, devices=2, ratios=(0.5, 0.5), host="127.0.0.1", port=free_port_pair(),
                                  threads=1, slots=3, context=256, config_dir=tmp / "config", cache_dir=tmp / "cache",
                                  join_timeout_s=120, profile=device_profile("master"), wire_dtype="f32",
                                  link_settings=LinkSettings(heartbeat_s=0.5, timeout_s=3.0)), **over})


def streams(service, engine, kill=None) -> list[Stream]:
    """The three questions streamed together (admitted before their first step); the first kills at KILL_AT."""
    greedy, prompts = SamplingParams(temperature=0.0), [chat_ids(engine.tokenizer, q) for q in QUESTIONS]
    with engine.lock:
        with service._cond:  # the service's loop takes all three at once: the same steps in every run
            out = [Stream(service, p, greedy, n=ANSWER_TOKENS, kill_at=[KILL_AT] if kill and i == 0 else [],
                          kill=kill) for i, p in enumerate(prompts)]
        deadline = time.monotonic() + HANG_S
        while service.snapshot()["running"] < len(out):
            assert time.monotonic() < deadline, service.snapshot()
            time.sleep(0.01)
    return out


def pause_seen(stream: Stream) -> float:
    """The pause a client saw: the longest wait between two pieces."""
    return max(b - a for a, b in zip(stream.times, stream.times[1:]))


def test_a_killed_worker_pauses_three_batched_streams_and_each_answer_is_the_undisturbed_one(tiny_llama_q4_0,
                                                                                           tmp_path):
    group = start_group(group_options(str(tiny_llama_q4_0), tmp_path, local_workers=1, rejoin_timeout_s=60))
    service = GenerationService(group.engine, status=group.status, queue_size=4)
    try:
        with sampled_logits(group.engine) as want_logits:
            want = [s.wait(HANG_S) for s in streams(service, group.engine)]
        assert len({w.text for w in want}) == 3 and all(len(w.tokens) == ANSWER_TOKENS for w in want)
        with sampled_logits(group.engine) as got_logits:
            got = streams(service, group.engine, kill=lambda: kill_worker(group))
            gens = [s.wait(HANG_S) for s in got]
        print(f"\n--parallel 3 (prompts of {[len(g.tokens) and g.prompt_tokens for g in gens]} tokens), worker "
              f"killed -9 at piece {KILL_AT} of the first answer: streams paused "
              f"{[round(pause_seen(s), 2) for s in got]} s; {timeline(group, got[0].killed_at[0])}")
        assert len(got_logits) == len(want_logits)  # every step's logits after the pause are the undisturbed ones
        for k, (a, b) in enumerate(zip(got_logits, want_logits)):
            np.testing.assert_array_equal(a, b, err_msg=f"sampling step {k}")
        for g, w, s in zip(gens, want, got):
            assert g.tokens == w.tokens and g.text == w.text
            assert "".join(s.pieces) == w.text  # every piece once, in order
            (pause,) = g.pauses
            assert "local-1 (rank 1): its connection closed" in g.stats()["pause_cause"] and g.stats()["paused_s"] > 0
        assert service.snapshot()["pauses"] == 3 and service.snapshot()["failed"] == 0
        kinds = [e["event"] for e in group.status()["events"]]
        assert {"lost", "restarted", "rejoined"} <= set(kinds) and kinds.count("resumed") == 3, kinds
    finally:
        service.close()
        group.close()


def test_when_no_group_can_be_formed_every_batched_request_fails_with_the_reason_and_health_answers(
        tiny_llama_q4_0, tmp_path):
    opts = group_options(str(tiny_llama_q4_0), tmp_path, replan=False, rejoin_timeout_s=1.0)
    box: dict = {}
    former = threading.Thread(target=lambda: box.update(group=start_group(opts, on_event=lambda e: None)))
    former.start()
    worker = join(opts.port, master_token(opts.config_dir), tmp_path, "w1")  # nobody restarts a joined device
    former.join(timeout=180)
    group = box["group"]
    service = GenerationService(group.engine, status=group.status, queue_size=4)
    try:
        running = streams(service, group.engine, kill=worker.kill9)
        errors = []
        for s in running:
            with pytest.raises(GroupUnavailableError) as failed:
                s.wait(HANG_S)
            errors.append(str(failed.value))
        print(f"\nno group can be formed: all 3 failed {time.monotonic() - running[0].killed_at[0]:.2f}s after the "
              f"kill: {errors[0]}")
        assert len(set(errors)) == 1 and "the group cannot re-form (device(s) w1 did not rejoin" in errors[0]
        assert service.snapshot()["failed"] == 3 and group.state == "degraded"
        api = TestClient(create_app(service))
        assert api.get("/health").json()["status"] == "degraded"
        refused = api.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert refused.status_code == 503 and "re-planning is off" in refused.json()["error"]["message"]
    finally:
        service.close()
        group.close()
        worker.kill9()


# ---- speculation and a lost device together (issues 16 + 17 + 18) ----

def run_speculating(engine, group, lose=lambda what, after, counts: False) -> tuple[list, dict, dict]:
    """run_batch's three sequences (with lookup drafts when engine.speculator is set); lose(what, after_rollback,
    counts) says when a step call (what: "verify" for one carrying a verify run, else False) or a rollback (what:
    "rollback") fails as a lost device's would. Returns the Generations, the counts (losses,
    rollbacks) and every logits row a step returned, keyed by (slot, the tokens up to its position)."""
    step, truncate = engine.step, engine.truncate
    counts = {"losses": 0, "rollbacks": 0, "after_rollback": False}
    held: dict[int, list[int]] = {}  # slot -> the tokens its runs put in it (a later run's start cuts it)
    rows_seen: dict[tuple, list[np.ndarray]] = {}

    def step_or_lose_a_device(ids, rows):
        # a run returning several rows' logits: a verify run (a replay's exact steps too, but lose() asks
        # for a verify step only before the first loss, when nothing has replayed)
        verify = rows.exact and any(o > 1 for o in rows.outputs) and "verify"
        after, counts["after_rollback"] = counts["after_rollback"], False
        if lose(verify, after, counts):
            counts["losses"] += 1
            threading.Thread(target=group.enter, args=("serving", "", engine.comm), daemon=True).start()
            raise GroupError(f"device w1 (rank 1) was lost (injected loss {counts['losses']})")
        logits = step(ids, rows)
        at = row = 0
        for slot, start, n, out in zip(rows.slots, rows.starts, rows.counts, rows.outputs):
            held[slot] = held.get(slot, [])[:start] + list(ids[at:at + n])
            for pos in range(start + n - out, start + n) if len(logits) else ():
                rows_seen.setdefault((slot, tuple(held[slot][:pos + 1])), []).append(logits[row].copy())
                row += 1
            at += n
        return logits

    def rolled_back(keep, slot=0):
        if keep:  # a rollback keeps the history; engine.reset (a replay, a new run) empties slots
            counts["rollbacks"] += 1
            counts["after_rollback"] = True
            if lose("rollback", False, counts):  # its broadcast to the workers fails
                counts["losses"] += 1
                threading.Thread(target=group.enter, args=("serving", "", engine.comm), daemon=True).start()
                raise GroupError(f"device w1 (rank 1) was lost (injected loss {counts['losses']})")
        truncate(keep, slot)

    engine.step, engine.truncate = step_or_lose_a_device, rolled_back
    try:
        _, gens = run_batch(engine, group)
    finally:
        for name in ("step", "truncate"):  # sampled_logits (in run_batch) already dropped its step over ours
            engine.__dict__.pop(name, None)
    return gens, counts, rows_seen


LOSSES = {  # when the two losses strike (counts["losses"]: the losses so far)
    "in-a-verify-step-then-right-after-a-rollback": lambda what, after, c: (c["losses"] == 0 and what == "verify")
    or (c["losses"] == 1 and after and what != "rollback"),
    "in-a-verify-step-then-in-a-rollback": lambda what, after, c: (c["losses"] == 0 and what == "verify")
    or (c["losses"] == 1 and what == "rollback")}


@pytest.mark.parametrize("losses", list(LOSSES))
def test_a_speculating_batch_lost_in_a_verify_step_and_at_a_rollback_answers_as_undisturbed_plain(
        engine, undisturbed, losses):
    """Reference: the undisturbed batch with speculation off (greedy). A step carrying drafts is exact (its verify
    and decode runs one-row decode steps' bits), plain decode rows equal lone ones on SmolLM2's weights, so every
    logits row the speculating, twice-paused batch computed at a position the plain one sampled is that row."""
    engine, group, _ = engine
    _, want = undisturbed
    plain_gens, _, plain_rows = run_speculating(engine, group)
    assert [g.tokens for g in plain_gens] == [w.tokens for w in want]
    engine.speculator = build_speculator(SpeculationOptions("lookup"), engine)
    try:
        # loss 1: the first step carrying a verify run; loss 2, once resumed: the first step after a rollback,
        # or the rollback itself (its broadcast fails)
        gens, counts, rows = run_speculating(engine, group, LOSSES[losses])
    finally:
        engine.speculator = None
    assert counts["losses"] == 2, counts
    assert [g.tokens for g in gens] == [w.tokens for w in want]
    assert [g.text for g in gens] == [w.text for w in want]
    assert plain_rows.keys() <= rows.keys()  # every position plain decoding sampled, the speculating batch computed
    for key, (a,) in plain_rows.items():
        for b in rows[key]:  # a replay's exact steps compute some rows again: the same bits
            np.testing.assert_array_equal(b, a, err_msg=f"slot {key[0]}, position {len(key[1]) - 1}")
    spec = [g.speculation for g in gens]
    drafted, accepted = sum(s["spec_drafted"] for s in spec), sum(s["spec_accepted"] for s in spec)
    assert 0 < accepted < drafted and counts["rollbacks"] >= 1, (spec, counts)  # verified, some kept, some rolled back
    # loss 1 paused all three; loss 2 those still running, each with its own pause
    assert all(g.pauses for g in gens) and sum(len(g.pauses) for g in gens) >= 4, [g.pauses for g in gens]
    assert {p["cause"] for g in gens for p in g.pauses} <= {f"device w1 (rank 1) was lost (injected loss {i})"
                                                           for i in (1, 2)}
