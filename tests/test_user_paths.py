"""What a user sees on the terminal, checked where no other test file looks."""
from __future__ import annotations

from tpi.formats import open_model


def test_opening_a_gguf_prints_no_llama_cpp_warning(smollm2, capfd):
    """llama-cpp-python's log table read ggml's WARN as an error, so every `tpi` command printed
    "llama_context: n_ctx_seq (512) > n_ctx_train (0) -- possible training context overflow" (the
    vocab-only tokenizer load has no n_ctx_train): a warning about nothing the user did."""
    tokenizer = open_model(str(smollm2)).tokenizer()
    assert tokenizer.encode("Hello", add_bos=False)  # the tokenizer loaded
    out, err = capfd.readouterr()
    assert "n_ctx_train" not in err and "n_ctx_train" not in out, err
