"""The resume replay (tpi.master.resume.replay) puts the same bits in the KV cache as the undisturbed run.

One device, in process: greedy-decode a sequence one token at a time, keeping each step's logits; then,
as after a device loss, reset the engine, replay the history and run the last token alone: the logits
must equal the decode step's bit for bit, so a resumed greedy answer is the undisturbed one. A plain
prefill of the whole history (one step of 64+ rows) is checked to differ, so the test can fail.
"""
from __future__ import annotations

import numpy as np
import pytest

from tpi.master import EngineOptions, build_local_engine
from tpi.master.generate import SequenceState
from tpi.formats import open_model
from tpi.master.resume import replay, replay_chunk
from tpi.master.sampler import SamplingParams


def decode(engine, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    engine.reset()
    logits, _ = engine.prefill(ids)
    tokens, seen = [], []
    for _ in range(n):
        tokens.append(int(np.argmax(logits)))
        seen.append(logits.copy())
        logits = engine.forward([tokens[-1]], len(ids) + len(tokens) - 1)[-1]
    return tokens, seen


def resumed_logits(engine, ids: list[int], tokens: list[int], chunk: int) -> np.ndarray:
    """The logits after `tokens`, computed as a resumed sequence computes them."""
    seq = SequenceState.start(ids, SamplingParams(temperature=0.0), 1000, engine.tokenizer)
    seq.out.tokens.extend(tokens)
    assert replay(engine, seq, chunk) == len(ids) + len(tokens) - 1
    return engine.forward([tokens[-1]], len(ids) + len(tokens) - 1)[-1]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "q4_k_m"])
def test_replay_gives_the_decode_steps_logits_bit_for_bit(which, smollm2, kquant_gguf):
    model = smollm2 if which == "smollm2" else kquant_gguf("Q4_K_M")
    engine = build_local_engine(EngineOptions(str(model), context=512, threads=1, backend="ggml"))
    chunk = replay_chunk(open_model(str(model)))
    assert chunk == (63 if which == "smollm2" else 3)  # Q4_1 is not repacked; Q4_K is
    ids = engine.tokenizer.encode("Once upon a time, in a small village,", add_bos=True, special=True)[:12]
    tokens, seen = decode(engine, ids, 100)
    for k in (1, 2, 40, 71, 99):  # tokens streamed before the loss
        np.testing.assert_array_equal(resumed_logits(engine, ids, tokens[:k], chunk), seen[k], err_msg=f"after {k}")
    engine.reset()
    whole, _ = engine.prefill(ids + tokens[:99])  # one step of 111 rows: ggml's tiled attention
    assert not np.array_equal(whole, seen[99])
    engine.model.weights.close()
