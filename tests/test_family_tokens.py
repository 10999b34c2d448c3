"""Chat templates, stop tokens and Qwen3's thinking tags of the issue-19 families, as tpi reads them from
each GGUF, against llama.cpp on the same file (llama-cpp-python's Jinja formatter, llama_vocab_is_eog)."""
from __future__ import annotations

import pytest

from family_models import FAMILY_VARIANTS

llama_cpp = pytest.importorskip("llama_cpp")
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

# One fixture per architecture; mistral_swa is Mistral's arch llama.
ARCH_FIXTURES = ["qwen3", "gemma3", "phi3", "mistral_swa"]
# Several turns: templates that close an assistant turn with eos_token (Mistral) write it into the prompt.
# The Qwen3 turn carries a thinking block, as a reply of a thinking model comes back into the history.
CONVERSATION = [
    {"role": "system", "content": "You are a tiny test model."},
    {"role": "user", "content": "Name three colours of the sea at dawn."},
    {"role": "assistant", "content": "<think>\nThe user wants colours.\n</think>\n\nGrey, pink and gold."},
    {"role": "user", "content": "And at dusk?"},
]
THINKING = "<think>\nCounting: 1, 2.\n</think>\n\nTwo."


@pytest.fixture(scope="module")
def opened(family_gguf):
    """variant -> (tpi's tokenizer, llama.cpp's vocab-only Llama) for its F32 file."""
    from tpi.formats import open_model

    made = {}

    def get(name: str):
        if name not in made:
            path = family_gguf(name)
            made[name] = (open_model(str(path)).tokenizer(),
                          llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False))
        return made[name]

    yield get
    for _, llm in made.values():
        llm.close()


def llama_cpp_chat_prompt(llm, messages) -> list[int]:
    """messages through the GGUF's template as llama-cpp-python's chat path renders it, then tokenized."""
    text = lambda i: llm._model.token_get_text(i)  # noqa: E731
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=text(llm.token_eos()),
                                    bos_token=text(llm.token_bos()))
    return llm.tokenize(formatter(messages=messages).prompt.encode(), add_bos=False, special=True)


@pytest.mark.parametrize("name", ARCH_FIXTURES)
def test_chat_prompt_is_the_ggufs_template_as_llama_cpp_renders_it(name, opened):
    tok, llm = opened(name)
    ours = tok.apply_chat_template(CONVERSATION)
    assert ours == llama_cpp_chat_prompt(llm, CONVERSATION)
    if FAMILY_VARIANTS[name]["arch"] == "llama":  # [INST] ... [/INST] answer</s>: eos_token is the real token
        assert ours.count(llm.token_eos()) == 1 and ours[0] == llm.token_bos()


@pytest.mark.parametrize("name", ARCH_FIXTURES)
def test_stop_tokens_are_llama_cpps_end_of_generation_tokens(name, opened):
    tok, llm = opened(name)
    eog = {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)}
    assert tok.stop_ids == eog and llm.token_eos() in eog
    assert all(tok.token_bytes(i) == b"" for i in eog)  # a stop token never shows in a reply


def test_qwen3_thinking_tags_pass_through_untouched(opened):
    tok, llm = opened("qwen3")
    ids = tok.encode(THINKING, add_bos=False, special=False)
    assert ids == llm.tokenize(THINKING.encode(), add_bos=False, special=False)
    think, end = (llm.tokenize(t.encode(), add_bos=False, special=True) for t in ("<think>", "</think>"))
    assert len(think) == len(end) == 1 and think[0] in ids and end[0] in ids  # one token each, even as text
    assert not {think[0], end[0]} & tok.stop_ids
    stream = tok.stream()  # what tpi run and the API stream, token by token
    assert "".join(stream.push(i) for i in ids) + stream.flush() == THINKING
    assert tok.decode(ids) == THINKING
