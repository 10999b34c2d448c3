"""The single-device engine against independent references: the fp32 numpy forward and llama.cpp.

Tolerances: the engine runs the default backend (auto: ggml where llama-cpp-python loads, else
numpy). ggml, as llama.cpp, quantizes the activations of a quantized weight's matmul to 8 bits per
32-element block: on the Q4 files that is 2.2-2.8% (max |diff| over max |logit|) against an fp32
forward through 2 layers (measured), so they get 4%; F32 / F16 files keep float activations (2%).
Q8_0 files lose more on torch and numpy, whose kernels requantize their group-of-32 scales to one
scale per row when they prepare them (tpi.quant.gguf_import.convert_ggml); those get 5%.
The SmolLM2 comparison runs llama.cpp with flash attention, the attention ggml's graphs compute
(its default, flash attention off, differs from it by up to 1.6 logits on SmolLM2: CPU flash
attention accumulates V in fp16).
"""
from __future__ import annotations

import numpy as np
import pytest

from tpi.master import EngineOptions, build_local_engine

TOKENS = [3, 17, 99, 5, 64, 200, 31, 7, 150, 42, 8, 77]
GGUF_VARIANTS = [
    "tiny_llama_q4_0", "tiny_llama_q4_1_tied", "tiny_llama_q8_0", "tiny_llama_f16", "tiny_llama_f32",
    "tiny_llama_mha_f32", "tiny_llama3_rope", "tiny_qwen2_q8_0", "tiny_qwen2_q4_0_tied", "tiny_qwen2_f32",
]


def rel_max_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def engine_for(path, context: int = 64):
    return build_local_engine(EngineOptions(model=str(path), context=context, threads=1))


@pytest.mark.parametrize("variant", GGUF_VARIANTS)
def test_tiny_gguf_logits_match_fp32_reference(variant, tiny_gguf, reference_of):
    path = tiny_gguf(variant)
    engine = engine_for(path)
    ours = engine.forward(TOKENS, 0, all_positions=True)  # (T, vocab)
    ref = reference_of(path).logits(TOKENS)
    tol = 0.05 if "q8_0" in variant else 0.04 if "q4" in variant else 0.02
    assert rel_max_err(ours, ref) < tol
    assert min(np.corrcoef(ours[i], ref[i])[0, 1] for i in range(len(TOKENS))) > 0.998


@pytest.mark.parametrize("variant", ["tiny_llama_f32", "tiny_llama3_rope", "tiny_qwen2_f32"])
@pytest.mark.parametrize("sharded", [False, True])
def test_tiny_hf_folder_matches_reference_and_gguf(variant, sharded, tiny_hf, tiny_gguf, reference_of):
    folder = tiny_hf(variant, sharded=sharded)
    ours = engine_for(folder).forward(TOKENS, 0, all_positions=True)
    assert rel_max_err(ours, reference_of(folder).logits(TOKENS)) < 0.02
    from_gguf = engine_for(tiny_gguf(variant)).forward(TOKENS, 0, all_positions=True)
    assert rel_max_err(ours, from_gguf) < 0.02


def test_incremental_decode_equals_one_full_forward(tiny_gguf):
    engine = engine_for(tiny_gguf("tiny_qwen2_q4_0_tied"))
    full = engine.forward(TOKENS, 0, all_positions=True)
    engine.reset()
    engine.forward(TOKENS[:5], 0)
    chunk = engine.forward(TOKENS[5:9], 5, all_positions=True)  # prefill continuing a cached prefix
    steps = [engine.forward([t], i)[-1] for i, t in enumerate(TOKENS[9:], start=9)]
    assert rel_max_err(chunk, full[5:9]) < 0.02
    assert rel_max_err(np.stack(steps), full[9:]) < 0.02


def test_prompt_reuses_cached_prefix(tiny_gguf):
    from tpi.master.sampler import SamplingParams

    engine = engine_for(tiny_gguf("tiny_llama_q4_0"))
    engine.reuse_prefix = True
    greedy = SamplingParams(temperature=0)
    first = engine.generate(TOKENS, greedy, 4, ignore_eos=True)
    again = engine.generate(TOKENS + first.tokens[:2], greedy, 2, ignore_eos=True)
    assert again.prefill_tokens == 1  # only the newest token ran; the rest came from the cache
    assert again.tokens == first.tokens[2:4]
    engine.reuse_prefix = False
    assert engine.generate(TOKENS, greedy, 1, ignore_eos=True).prefill_tokens == len(TOKENS)


# ---- the real embedded model against llama.cpp -------------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List three fruits."}],
]


NEAR_TIE = 0.25  # logits; see test_smollm2_logits_track_llama_cpp


@pytest.fixture(scope="module")
def smollm2_engine(smollm2):
    return build_local_engine(EngineOptions(model=str(smollm2), context=512, threads=2))


@pytest.fixture(scope="module")
def smollm2_llama(smollm2):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(smollm2), n_ctx=512, n_threads=2, logits_all=True, flash_attn=True,
                          verbose=False)
    yield llm
    llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_smollm2_logits_track_llama_cpp(chat, smollm2_engine, smollm2_llama):
    ids = smollm2_engine.tokenizer.apply_chat_template(CHATS[chat])
    smollm2_engine.reset()
    ours = smollm2_engine.forward(ids, 0)[-1]
    smollm2_llama.reset()
    smollm2_llama.eval(ids)
    theirs = np.asarray(smollm2_llama.scores[len(ids) - 1])
    assert np.corrcoef(ours, theirs)[0, 1] >= 0.995
    assert len(set(np.argsort(-ours)[:5]) & set(np.argsort(-theirs)[:5])) >= 4

    # The first answer token is a near-tie on SmolLM2 (DESIGN §8): force llama.cpp's. Then 16
    # steps, both fed llama.cpp's greedy token: our greedy choice must equal llama.cpp's, except
    # where llama.cpp's own top-2 margin is under NEAR_TIE logits; there ours must be one of its
    # top 2. (Our logits leave the output kernel in bf16: a 0.125 step at |logit| 16-32, and our
    # top-2 margins differ from llama.cpp's by up to ~0.25 on these chats.)
    seq = ids + [int(theirs.argmax())]
    smollm2_engine.reset()
    logits = smollm2_engine.forward(seq, 0)[-1]
    smollm2_llama.reset()
    smollm2_llama.eval(seq)
    strict = 0
    for i in range(16):
        ref = np.asarray(smollm2_llama.scores[smollm2_llama.n_tokens - 1])
        top2 = np.argsort(-ref)[:2]
        if ref[top2[0]] - ref[top2[1]] >= NEAR_TIE:
            assert int(logits.argmax()) == int(top2[0]), f"step {i}"
            strict += 1
        else:
            assert int(logits.argmax()) in top2, f"step {i} (near-tie)"
        smollm2_llama.eval([int(top2[0])])
        logits = smollm2_engine.forward([int(top2[0])], len(seq) + i)[-1]
    assert strict >= 10  # the rule must leave most steps strict, or the test proves little (chat 1: 10 of 16)


@pytest.mark.slow
def test_chat_template_tokens_equal_llama_cpp_tokenization(smollm2_engine, smollm2_llama):
    from tpi.model.tokenizer import render_chat

    tok = smollm2_engine.tokenizer
    text = render_chat(tok.chat_template, CHATS[2], "", "")
    assert tok.apply_chat_template(CHATS[2]) == smollm2_llama.tokenize(text.encode(), add_bos=True, special=True)
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
