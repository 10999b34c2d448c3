"""Sampling rules against direct numpy computations, and stop-string streaming."""
from __future__ import annotations

import numpy as np
import pytest

from tpi.master.generate import StopStringFilter
from tpi.master.sampler import SamplingParams, apply_repeat_penalty, sample, sequence_seed

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], dtype=np.float32)


def draw(params: SamplingParams, n: int = 4000, history=()) -> np.ndarray:
    rng = np.random.default_rng(params.seed)
    return np.bincount([sample(LOGITS, params, list(history), rng) for _ in range(n)], minlength=len(LOGITS)) / n


def test_greedy_is_argmax_and_ignores_rng():
    assert sample(LOGITS, SamplingParams(temperature=0), [], np.random.default_rng(1)) == 5


def test_plain_temperature_sampling_follows_softmax():
    p = np.exp(LOGITS / 0.7) / np.exp(LOGITS / 0.7).sum()
    freq = draw(SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=3))
    assert np.abs(freq - p).max() < 0.03


def test_top_k_keeps_only_the_k_best():
    freq = draw(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=4))
    assert set(np.nonzero(freq)[0]) == {0, 5}
    p = np.exp([3.0, 2.0]) / np.exp([3.0, 2.0]).sum()
    assert abs(freq[5] - p[0]) < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = np.sort(np.exp(LOGITS) / np.exp(LOGITS).sum())[::-1]  # 0.59, 0.22, 0.08, ...
    assert p[0] < 0.7 < p[0] + p[1]
    freq = draw(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0, seed=5))
    assert set(np.nonzero(freq)[0]) == {5, 0}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    freq = draw(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3, seed=6))
    # exp(2-3) = 0.37 >= 0.3 stays; exp(1-3) = 0.14 goes
    assert set(np.nonzero(freq)[0]) == {5, 0}


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    out = apply_repeat_penalty(LOGITS, [5, 4], 2.0, 64)
    assert out[5] == pytest.approx(1.5) and out[4] == pytest.approx(-2.0) and out[0] == LOGITS[0]
    assert sample(LOGITS, SamplingParams(temperature=0, repeat_penalty=2.0), [5], np.random.default_rng()) == 0


def test_same_seed_same_tokens():
    a = draw(SamplingParams(temperature=1.0, seed=11), n=50)
    b = draw(SamplingParams(temperature=1.0, seed=11), n=50)
    assert np.array_equal(a, b)


def test_stop_string_split_across_pieces_is_held_back_and_cut():
    f = StopStringFilter(["</end>"])
    out = [f.push(p) for p in ["Hello wor", "ld</e", "nd> trailing"]]
    assert "".join(out) == "Hello world" and f.hit
    assert out[1] == "ld"  # "</e" was held back: it could have begun the stop string


def test_held_back_text_is_released_when_it_is_not_a_stop():
    f = StopStringFilter(["STOP"])
    assert f.push("ST") == ""
    assert f.push("ART") == "START"
    assert not f.hit and f.flush() == ""


def test_the_text_ends_at_the_first_stop_string_in_it_whichever_is_listed_first():
    f = StopStringFilter(["e", "a"])
    assert f.push(" alter") == " " and f.hit  # "a" comes first in the text, though "e" is listed first


def test_seed_minus_one_is_random_as_in_llama_cpp_and_other_seeds_repeat():
    """llama.cpp's server and CLI read seed -1 as "random"; it was a fixed seed (2**64 - 1) here."""
    assert len({sequence_seed(-1) for _ in range(3)}) == 3 and len({sequence_seed(None) for _ in range(3)}) == 3
    assert sequence_seed(7) == sequence_seed(7) and sequence_seed(-2) == sequence_seed(-2) == 2**64 - 2
