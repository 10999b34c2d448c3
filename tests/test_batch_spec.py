"""Speculation inside continuous batching (issues 17 and 18): a decoding slot's run carries its drafts.

Reference: the same request alone with speculation off (tests/test_batching.py's `alone`, a one-slot
engine). Identity rule: a step that carries drafts is exact (tpi.master.batch_spec): its verify runs
and decode rows are computed as one-row decode steps bit for bit, and its prompt chunks as batched
prefill rows, which equal a lone prefill's on Q4_0-class weights (tests/test_rows.py; the tiny model
here is Q4_0). So greedy tokens must be equal, every one, and a seeded sampled request draws the same
tokens as plain decoding (the same token_rng(seed, position) per position). On K-quant or F16 weights
prompt rows would follow the near-tie rule of tests/test_layers_ggml_group.py instead.
"""
from __future__ import annotations

import logging

import pytest
from test_batching import CONTEXT, reference, tiny_model  # noqa: F401 (fixtures)

from tpi.errors import TpiError
from tpi.master.batch import Batch, Running
from tpi.master.batch_spec import BatchSpeculation
from tpi.master.drafters import PromptLookup
from tpi.master.generate import SequenceState
from tpi.master.options import EngineOptions, GroupOptions
from tpi.master.sampler import SamplingParams
from tpi.master.setup import build_local_engine, start_group
from tpi.master.speculation import KPolicy, SpeculationOptions, Speculator, build_speculator

# repeating text makes prompt lookup draft; each prompt repeats its own words
PROMPTS = ["one two three four five six. one two three four five six. one two three",
           "red green blue red green blue red green blue red green",
           "the cat sat on the mat and the cat sat on the mat and the cat",
           "a b c d e f g a b c d e f g a b c d"]
MAX_TOKENS = [24, 17, 30, 21]


def run_batch(engine, prompts, params, max_tokens, stop=()):
    """Every prompt admitted at once into a Batch over engine (params: one for all, or one each);
    -> the Generations, in order, and the Batch."""
    batch, ends = Batch(engine, prefill_budget=16), {}
    for i, (ids, n) in enumerate(zip(prompts, max_tokens)):
        p = params[i] if isinstance(params, list) else params
        seq = SequenceState.start(ids, p, n, engine.tokenizer, stop=stop, ignore_eos=True)
        batch.admit(Running(seq, lambda piece: None, lambda gen, err, i=i: ends.__setitem__(i, (gen, err)),
                            lambda: False))
    while batch.running:
        batch.step()
    assert all(err is None for _, err in ends.values()), ends
    return [ends[i][0] for i in range(len(prompts))], batch


def lone(engine, ids, params, n, stop=()):
    return engine.generate(ids, params, n, stop=stop, ignore_eos=True)


@pytest.fixture(scope="module")
def spec_engine(tiny_model):
    engine = build_local_engine(EngineOptions(model=tiny_model, context=CONTEXT, backend="ggml", threads=1, slots=4))
    engine.speculator = build_speculator(SpeculationOptions("lookup"), engine)
    return engine


def encoded(engine):
    return [engine.tokenizer.encode(p, add_bos=True, special=True) for p in PROMPTS]


def test_four_greedy_requests_with_lookup_drafts_each_get_their_lone_plain_answer(spec_engine, reference):
    greedy = SamplingParams(temperature=0.0)
    prompts = encoded(spec_engine)
    want = [lone(reference, p, greedy, n).tokens for p, n in zip(prompts, MAX_TOKENS)]
    got, batch = run_batch(spec_engine, prompts, greedy, MAX_TOKENS)
    assert [g.tokens for g in got] == want
    assert all(len(g.tokens) == n for g, n in zip(got, MAX_TOKENS))
    drafted = sum(g.speculation["spec_drafted"] for g in got)
    accepted = sum(g.speculation["spec_accepted"] for g in got)
    assert 0 < accepted < drafted, [g.speculation for g in got]  # drafts verified, some kept, some rolled back
    # the planner's --acceptance: kept / (kept + verify passes that rejected one); a rollback counts
    for g in got:
        st = g.speculation
        assert st["spec_acceptance"] <= st["spec_acceptance_per_draft"] <= 1.0, st
    assert any(g.speculation["spec_acceptance_per_draft"] < 1.0 for g in got), [g.speculation for g in got]
    assert batch.rows > batch.steps  # steps carried several rows
    status = spec_engine.speculator.status()  # what /health shows
    assert status["spec_drafted"] >= drafted and status["tokens_per_forward"] > 1


def test_seeded_sampling_with_drafts_draws_plain_decodings_tokens(spec_engine, reference):
    prompts = encoded(spec_engine)
    # at 0.1 lookup drafts (and some are kept, some not); at 0.8 the text rarely repeats
    params = [SamplingParams(temperature=t, seed=11 + i) for i, t in enumerate((0.1, 0.1, 0.1, 0.8))]
    want = [lone(reference, p, q, n).tokens for p, q, n in zip(prompts, params, MAX_TOKENS)]
    got, _ = run_batch(spec_engine, prompts, params, MAX_TOKENS)
    assert [g.tokens for g in got] == want
    drafted = sum(g.speculation["spec_drafted"] for g in got[:3])
    assert 0 < sum(g.speculation["spec_accepted"] for g in got[:3]) < drafted


def test_a_stop_string_or_max_tokens_inside_an_accepted_run_ends_the_answer_there(spec_engine, reference):
    greedy = SamplingParams(temperature=0.0)
    prompts = encoded(spec_engine)
    plain = [lone(reference, p, greedy, n) for p, n in zip(prompts, MAX_TOKENS)]
    # a stop string from the middle of the second answer, and max_tokens cutting the others short
    text = plain[1].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    want = [lone(reference, p, greedy, n, stop=(stop,)) for p, n in zip(prompts, (7, 17, 9, 5))]
    got, _ = run_batch(spec_engine, prompts, greedy, (7, 17, 9, 5), stop=(stop,))
    assert [(g.tokens, g.text, g.finish_reason) for g in got] == [(w.tokens, w.text, w.finish_reason) for w in want]
    assert got[1].finish_reason == "stop" and stop not in got[1].text
    assert any(g.speculation["spec_accepted"] for g in got)


def test_draft_model_with_several_slots_is_refused_naming_both_fixes(tiny_model):
    with pytest.raises(TpiError, match="--parallel 3.*drop --draft.*--parallel 1"):
        GroupOptions(model=tiny_model, slots=3, speculate="auto", draft=tiny_model)


def test_batched_serving_builds_a_speculator(tiny_model, tmp_path, caplog):
    """--parallel > 1 speculates too (no "speculation is off" any more); /health shows it."""
    with caplog.at_level(logging.INFO, logger="tpi.master.setup"):
        group = start_group(GroupOptions(model=tiny_model, context=CONTEXT, slots=2, speculate="lookup",
                                         backend="ggml", config_dir=tmp_path / "c", cache_dir=tmp_path / "k"))
    try:
        assert group.engine.speculator is not None and group.engine.speculator.status()["mode"] == "lookup"
        assert "speculation is off" not in caplog.text
    finally:
        group.close()


def test_a_two_device_group_speculating_in_batches_answers_as_each_alone_plain(tiny_model, reference, tmp_path):
    group = start_group(GroupOptions(model=tiny_model, local_workers=1, slots=4, context=CONTEXT, threads=1,
                                     backend="ggml", worker_backend="ggml", insecure=True, wire_dtype="f32",
                                     speculate="lookup", config_dir=tmp_path / "config", cache_dir=tmp_path / "cache"))
    try:
        engine = group.engine
        greedy = SamplingParams(temperature=0.0)
        prompts = encoded(engine)
        want = [lone(reference, p, greedy, n).tokens for p, n in zip(prompts, MAX_TOKENS)]
        steps0 = engine.model.comm.stats.steps
        got, batch = run_batch(engine, prompts, greedy, MAX_TOKENS)
        assert [g.tokens for g in got] == want
        spec = [g.speculation for g in got]
        assert sum(s["spec_accepted"] for s in spec) > 0  # the worker verified drafts, some were kept
        assert sum(s["spec_forwards"] for s in spec) < sum(s["tokens_per_forward"] * s["spec_forwards"] for s in spec)
        assert engine.model.comm.stats.steps - steps0 == batch.steps  # one group step per batched step
    finally:
        group.close()


def test_auto_drafts_where_an_extra_row_is_cheap_against_a_slots_share_of_the_step():
    """KPolicy's rule with the batch's measured costs: a plain step of 4 slots takes 100 ms. On one CPU
    device a drafted row costs a row's share of it (25 ms): no k pays, plain decoding. In a group, where
    round trips make the step, it costs 1 ms: the slots that keep their drafts speculate, the one whose
    drafts miss does not."""
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9] * 3 + [1, 2]  # lookup drafts 3 4 5 ...
    decoding = [(i, history, 100) for i in range(4)]
    def measured(row_s: float) -> BatchSpeculation:
        spec = BatchSpeculation(Speculator(PromptLookup(), KPolicy(8), "auto"))
        for seconds in (0.5, 0.1, 0.1):  # the first step of a shape builds its graphs: no sample
            spec.record_step(4, 0, seconds)
        for seconds in (0.5, 0.1 + 4 * row_s):
            spec.record_step(4, 4, seconds)
        for i in range(4):
            for _ in range(40):
                spec.slot(i).policy.record_shadow(i != 1)  # slot 1's guesses miss
        return spec

    assert [len(measured(0.001).plan(decoding, CONTEXT)[i]) for i in range(4)] == [8, 0, 8, 8]
    cpu = measured(0.025)
    plans = [cpu.plan(decoding, CONTEXT) for _ in range(16)]
    assert all(len(d) == 0 for p in plans[:15] for d in p.values())
    # while no slot drafts, the batch (not each slot) probes with one draft now and then: the 16th step
    assert sorted(map(len, plans[15].values())) == [0, 0, 0, 1]
