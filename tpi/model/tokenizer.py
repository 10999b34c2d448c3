"""Tokenizer and chat template, both taken from the model itself.

GGUF: llama.cpp's own tokenizer (llama-cpp-python, vocab_only), so token ids match llama.cpp.
HF folders: the `tokenizers` library with tokenizer.json and tokenizer_config.json.
"""
from __future__ import annotations

import codecs
import json
import logging
from datetime import datetime
from pathlib import Path

from tpi.errors import ModelFormatError, pip_install

# Marker texts that end a turn in common chat templates; a marker that the vocabulary has as a
# single token stops generation, as llama.cpp's end-of-generation set does.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "</s>", "<end_of_turn>", "<|eom_id|>")


def render_chat(template: str, messages: list[dict], bos: str, eos: str, add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face style Jinja chat template in a sandbox."""
    from jinja2 import TemplateError  # only chat templates need jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        )
    except TemplateError as e:
        raise ModelFormatError(f"the model's chat template failed: {e}; use --raw to send the prompt as is") from None


class Tokenizer:
    """Common surface: encode, decode, chat template, BOS/EOS and stop tokens."""

    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]
    chat_template: str | None
    vocab_size: int

    def encode(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        raise NotImplementedError

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def special_text(self, token: int) -> str:
        """A token's own text, special ones included ("<s>", "</s>"): what a chat template's bos_token is."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")

    def stream(self) -> "TextStream":
        return TextStream(self)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.chat_template:
            raise ModelFormatError("this model has no chat template; use --raw to send the prompt as is")
        # token_text is what a reply shows (nothing for control and stop tokens); a template writes the tokens
        bos = self.special_text(self.bos_id) if self.bos_id is not None else ""
        eos = self.special_text(self.eos_id) if self.eos_id is not None else ""
        text = render_chat(self.chat_template, messages, bos, eos, add_generation_prompt)
        ids = self.encode(text, add_bos=True, special=True)
        if len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:  # template wrote BOS and so did the tokenizer
            ids = ids[1:]
        return ids

    def _collect_stops(self) -> frozenset[int]:
        stops = {t for t in (self.eos_id,) if t is not None}
        for marker in END_MARKERS:
            ids = self.encode(marker, add_bos=False, special=True)
            if len(ids) == 1:
                stops.add(ids[0])
        return frozenset(stops)


class TextStream:
    """Turns a token stream into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tok.token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def fix_llama_log_levels(llama_cpp) -> None:
    """Read llama.cpp's log levels as ggml.h numbers them (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4).

    llama-cpp-python 0.3.36's table predates DEBUG = 1 and reads WARN as an error, so with verbose=False
    every vocab-only load printed "n_ctx_seq (512) > n_ctx_train (0) -- possible training context
    overflow" (vocab-only files have no n_ctx_train) while real errors were read as debug.
    """
    table = getattr(getattr(llama_cpp, "_logger", None), "GGML_LOG_LEVEL_TO_LOGGING_LEVEL", None)
    if isinstance(table, dict) and table.get(1) == logging.INFO:  # the stale table (a fixed one is left alone)
        table.update({1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR})


class LlamaCppTokenizer(Tokenizer):
    """llama.cpp's tokenizer for a GGUF file (loads only the vocabulary)."""

    def __init__(self, path: Path, metadata):
        try:
            import llama_cpp  # optional: GGUF tokenizers only
        except ImportError:
            raise ModelFormatError(f"llama-cpp-python is needed to tokenize GGUF models; {pip_install('all')}") from None
        fix_llama_log_levels(llama_cpp)
        self._llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab_size = self._llm.n_vocab()
        self.bos_id = _opt_id(metadata("tokenizer.ggml.bos_token_id"))
        self.eos_id = _opt_id(metadata("tokenizer.ggml.eos_token_id"))
        self.chat_template = metadata("tokenizer.chat_template")
        extra = {_opt_id(metadata(f"tokenizer.ggml.{k}_token_id")) for k in ("eot", "eom")} - {None}
        self.stop_ids = self._collect_stops() | extra
        self._cache: dict[int, bytes] = {}

    def encode(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        # add_bos=True means "as the model's metadata says" (llama.cpp's add_special).
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def special_text(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        b = self._cache.get(token)
        if b is None:
            b = self._cache[token] = b"" if token in self.stop_ids else self._llm.detokenize([token])
        return b


class HFTokenizer(Tokenizer):
    """`tokenizers` with the chat template and special tokens from tokenizer_config.json."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTok  # optional: Hugging Face folders only

        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ModelFormatError(f"{folder}: tokenizer.json is missing; copy it from the model's repository")
        self._tok = HFTok.from_file(str(tj))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = cfg.get("chat_template")
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id = self._special_id(cfg.get("bos_token"))
        self.eos_id = self._special_id(cfg.get("eos_token"))
        self._add_bos = bool(cfg.get("add_bos_token", False))
        self.stop_ids = self._collect_stops()

    def _special_id(self, tok) -> int | None:
        if isinstance(tok, dict):
            tok = tok.get("content")
        return None if tok is None else self._tok.token_to_id(tok)

    def encode(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self._add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def special_text(self, token: int) -> str:
        return self._tok.decode([token], skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        if token in self.stop_ids:
            return b""
        return self._tok.decode([token], skip_special_tokens=False).encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=False)


def _opt_id(v) -> int | None:
    return None if v is None else int(v)
