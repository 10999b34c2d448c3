"""Speculative decoding on one device: drafters, the acceptance rule, adaptive k, same tokens as plain.

The reference for every decode test is the same engine with speculation off (plain decoding, which
tests/test_engine_reference.py holds to llama.cpp); the acceptance rule's reference is the target
distribution itself (a chi-square test over many seeds on a tiny model's logits).
"""
from __future__ import annotations

import numpy as np
import pytest

from tpi.errors import TpiError
from tpi.master import GroupOptions, start_group
from tpi.master.acceptance import verify
from tpi.master.drafters import DraftModel, PromptLookup, check_same_vocabulary
from tpi.master.sampler import SamplingParams, distribution, token_rng
from tpi.master.speculation import (KPolicy, SpeculationOptions, Speculator, best_k, build_speculator,
                                    expected_tokens)

REPEATING = "one two three four five six seven eight. one two three four five six seven eight. one two"


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    look = PromptLookup()
    seq = [5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    assert look.propose(seq, 3).tokens == (7, 8, 4)  # the latest earlier "1 2 3" was followed by 7 8 4
    assert look.propose(seq + [7, 8], 2).tokens == (4, 1)  # grows incrementally with the sequence
    assert look.propose([1, 2, 3, 4], 3).tokens == ()  # another sequence: starts over, nothing repeats
    assert look.propose([1, 2, 1, 2], 0).tokens == ()


def test_expected_tokens_and_best_k():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert best_k(0.05, 1.0, 0.3, 0.0, 8) == 0  # drafts rarely kept: speculation does not pay
    assert best_k(0.9, 1.0, 0.02, 0.0, 8) == 8  # a group: extra rows are nearly free
    assert 0 < best_k(0.8, 1.0, 0.3, 0.0, 8) < 8


def test_policy_turns_speculation_off_when_drafts_miss_and_back_on():
    policy = KPolicy(8)
    assert policy.choose(8) == 0  # a plain forward is measured first
    policy.record_plain(0.100)  # the first step of a shape builds its graphs: not a cost sample
    assert policy.choose(8) == 0
    policy.record_plain(0.010)
    for _ in range(30):
        policy.record_verify(4, 0, 0.014, 0.0)
    assert policy.choose(8) == 0
    for _ in range(16):
        policy.record_plain(0.010)
    assert policy.choose(8) == 1  # a probe now and then re-measures the costs
    for _ in range(60):
        policy.record_shadow(True)
    assert policy.choose(8) > 0
    assert policy.choose(3) == 2  # step sizes 1, 2, 4, 8: few graph shapes
    assert KPolicy(5, adaptive=False).choose(8) == 4


def test_options_refuse_bad_input():
    with pytest.raises(TpiError, match="--speculate"):
        SpeculationOptions(mode="always")
    with pytest.raises(TpiError, match="--draft"):
        SpeculationOptions(mode="lookup", draft="x.gguf")
    # checked here, before anything loads: with --parallel > 1 the speculator (which opens it) is never built
    with pytest.raises(TpiError, match="--draft missing.gguf: no such file"):
        SpeculationOptions(mode="auto", draft="missing.gguf")


def test_a_draft_that_is_no_model_is_refused_naming_the_flag(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(TpiError, match=r"^--draft .*notes.txt cannot be the draft model: .*not a readable GGUF"):
        DraftModel.open(str(notes), None, 64, 1)


class _Vocab:
    def __init__(self, words):
        self.words, self.vocab_size = words, len(words)

    def token_bytes(self, i):
        return self.words[i]


def test_vocabulary_check_names_the_mismatch():
    check_same_vocabulary(_Vocab([b"a", b"b"]), _Vocab([b"a", b"b"]), "d.gguf")
    with pytest.raises(TpiError, match="vocabulary of 3 tokens"):
        check_same_vocabulary(_Vocab([b"a", b"b"]), _Vocab([b"a", b"b", b"c"]), "d.gguf")
    with pytest.raises(TpiError, match="spells token 1"):
        check_same_vocabulary(_Vocab([b"a", b"b"]), _Vocab([b"a", b"x"]), "d.gguf")


@pytest.fixture(scope="module")
def smol_engine(smollm2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    group = start_group(GroupOptions(model=str(smollm2), context=512, config_dir=tmp / "c", cache_dir=tmp / "k"))
    yield group.engine
    group.close()


class ScriptedDrafter:
    """Drafts the given continuation with every third token wrong: both outcomes of the rule run."""

    name = "lookup"  # cheap: consulted every step, as prompt lookup is

    def __init__(self, prompt: list[int], tokens: list[int]):
        self.script = prompt + tokens

    def propose(self, history, k, *_):
        from tpi.master.drafters import Draft

        n = len(history)
        out = [t if (n + j) % 3 else (t + 1) % 300 for j, t in enumerate(self.script[n:n + k])]
        return Draft(tuple(out))

    def close(self) -> None:
        pass


def generate(engine, mode: str, params: SamplingParams, prompt: str = REPEATING, n: int = 24, drafter=None):
    engine.speculator = build_speculator(SpeculationOptions(mode=mode), engine)
    if drafter is not None:
        engine.speculator.drafter = drafter
    try:
        engine.reset()
        ids = engine.tokenizer.encode(prompt, add_bos=True, special=True)
        return engine.generate(ids, params, n, ignore_eos=True)
    finally:
        engine.speculator = None


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0),
                                    SamplingParams(temperature=0.0, repeat_penalty=1.3),
                                    pytest.param(SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7),
                                                 marks=pytest.mark.slow)],
                         ids=["greedy", "greedy-penalty", "sampled"])
def test_speculation_gives_plain_decoding_tokens(params, smol_engine):
    plain = generate(smol_engine, "off", params)
    for mode in ("lookup", "auto"):
        assert generate(smol_engine, mode, params).tokens == plain.tokens, mode
    prompt = smol_engine.tokenizer.encode(REPEATING, add_bos=True, special=True)
    scripted = generate(smol_engine, "lookup", params, drafter=ScriptedDrafter(prompt, plain.tokens))
    assert scripted.tokens == plain.tokens
    stats = scripted.stats()
    assert 0 < stats["spec_accepted"] < stats["spec_drafted"] and stats["tokens_per_forward"] > 1.0, stats


def test_per_draft_acceptance_is_the_rate_the_planner_takes(smol_engine):
    """ScriptedDrafter gets every third position wrong: once in step, each verify pass keeps 2 drafts and
    rejects the third, so a draft is kept 2/3 of the time when those before it were (the planner's
    acceptance, E(k) = 1 + a + ... + a^k), while the share of the 8 drafted tokens kept is 2/8."""
    params = SamplingParams(temperature=0.0)
    plain = generate(smol_engine, "off", params, n=40)
    prompt = smol_engine.tokenizer.encode(REPEATING, add_bos=True, special=True)
    stats = generate(smol_engine, "lookup", params, n=40, drafter=ScriptedDrafter(prompt, plain.tokens)).stats()
    assert abs(stats["spec_acceptance_per_draft"] - 2 / 3) < 0.08, stats
    assert stats["spec_acceptance"] < 0.4, stats


def test_lookup_on_repeating_text_yields_several_tokens_per_forward(smol_engine):
    stats = generate(smol_engine, "lookup", SamplingParams(temperature=0.0)).stats()
    # the model continues the pattern for 6 tokens (" three ... eight."), then leaves it: all 6 come
    # from one verify pass
    assert stats["spec_accepted"] >= 5 and stats["tokens_per_forward"] > 1.2, stats


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~1e-3 (z = 3.09), by Wilson and Hilferty."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_acceptance_rule_keeps_the_target_distribution(smol_engine):
    """verify() with sampled drafts (q: a tempered distribution of the same logits, so it often
    disagrees with p): the first token over many seeds follows p (chi-square), as the rule promises."""
    engine = smol_engine
    engine.reset()
    ids = engine.tokenizer.encode("The weather today is", add_bos=True, special=True)
    logits = engine.forward(ids, 0)[-1]
    target = SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0)
    drafter = SamplingParams(temperature=2.5, top_k=8, top_p=1.0, min_p=0.0)
    p_ids, p = distribution(logits, target, ids)
    q = distribution(logits, drafter, ids)
    rows = np.stack([logits, logits])  # the bonus row is not reached when the draft is rejected
    counts = {int(t): 0 for t in p_ids}
    trials, kept = 4000, 0
    for seed in range(trials):
        x = int(q[0][token_rng(seed, 0, 1).choice(len(q[1]), p=q[1])])
        verdict = verify(rows, [x], target, ids, lambda j: token_rng(seed, len(ids) + j), [q])
        counts[verdict.tokens[0]] += 1
        kept += verdict.accepted
    observed = np.array([counts[int(t)] for t in p_ids])
    assert observed.sum() == trials  # nothing outside the target's support
    expected = p * trials
    small = expected < 5  # bins this thin are pooled, as the chi-square approximation needs
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    stat = float((((observed - expected) ** 2) / np.maximum(expected, 1e-9)).sum())
    assert stat <= chi2_critical(len(observed) - 1), (observed, expected)
    assert 0 < kept < trials  # both branches of the rule ran


def test_draft_model_of_the_same_weights_is_always_right(smol_engine, smollm2, tiny_gguf):
    """A draft model run on the master: greedy drafts of the target's own weights are all kept (a
    verify row's logits are its decode step's), and the tokens are plain decoding's."""
    params = SamplingParams(temperature=0.0)
    plain = generate(smol_engine, "off", params)
    draft = DraftModel.open(str(smollm2), smol_engine.tokenizer, 512, None)
    smol_engine.speculator = Speculator(draft, KPolicy(4, adaptive=False), "auto")
    try:
        smol_engine.reset()
        ids = smol_engine.tokenizer.encode(REPEATING, add_bos=True, special=True)
        spec = smol_engine.generate(ids, params, 24, ignore_eos=True)
    finally:
        smol_engine.speculator = None
        draft.close()
    assert spec.tokens == plain.tokens
    assert spec.speculation["spec_acceptance"] == 1.0 and spec.speculation["tokens_per_forward"] > 3
    with pytest.raises(TpiError, match="vocabulary of 384 tokens"):
        DraftModel.open(str(tiny_gguf("tiny_llama_q4_0")), smol_engine.tokenizer, 64, None)
