"""tpi's native model file: a one-rank shard store plus the tokenizer, written by `tpi convert`
(tpi.master.convert).

OUT.tpis holds every block as a rank of a group of one cuts them (GGUF types kept as they are;
q|k|v and gate|up fused where their types agree, else apart); OUT.tpis.vocab.gguf is a weightless GGUF carrying the original
metadata, so llama.cpp's tokenizer and the chat template come along. Opening OUT.tpis gives a
source with canonical tensor names again, so it can be split for any group size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tpi.model.blocks import BLOCK_NAME, GLOBALS, block_of, fused_name, part_rows
from tpi.model.config import ModelConfig, config_from_dict
from tpi.errors import ModelFormatError
from tpi.model.tokenizer import HFTokenizer, LlamaCppTokenizer
from tpi.quant.formats import slice_rows
from tpi.scheduler.store import ShardStore

NATIVE_FORMAT = "tpi-native-2"  # 2: GGUF-typed blocks, q|k|v and gate|up possibly unfused
READABLE_FORMATS = ("tpi-native-1", NATIVE_FORMAT)  # 1: q4g32 / q8 / bf16 blocks, always fused
VOCAB_SUFFIX = ".vocab.gguf"


class NativeSource:
    """A converted model: canonical tensors are sliced back out of the fused blocks."""

    kind = "native"

    def __init__(self, path: Path):
        self.store = ShardStore.open(path)
        meta = self.store.meta
        if meta.get("format") not in READABLE_FORMATS:
            raise ModelFormatError(f"{path}: a tpi shard, not a converted model; convert with tpi convert MODEL OUT")
        self.path = path
        self.config: ModelConfig = config_from_dict(meta["config"])
        self.notes: dict[str, object] = {}
        self._kind = meta.get("tokenizer", "gguf")

    def _block(self, key: str) -> dict:
        return self.store.load(key, copy=False)

    def load(self, name: str):
        """A canonical tensor, sliced back out of its (possibly fused) block: views, no copy."""
        cfg = self.config
        if not name.startswith("layers."):
            g = self._block(GLOBALS)
            if name not in g:
                raise ModelFormatError(f"{self.path}: {name} is missing")
            return g[name]
        _, i, short = name.split(".", 2)
        block = self._block(block_of(short, int(i)))
        inner = BLOCK_NAME.get(short, short)
        if inner in block:  # never fused, or kept apart (parts of differing types)
            return block[inner]
        fused = fused_name(inner)
        start, stop = part_rows(fused, inner, cfg.q_dim, cfg.kv_dim, cfg.intermediate)
        t = block[fused]
        return t[start:stop] if isinstance(t, np.ndarray) else slice_rows(t, start, stop)

    def weight_fmt(self, name: str) -> str:
        """The fmt of a matrix as stored (read from the index; no weight bytes are touched)."""
        return self.load(name).fmt

    def tokenizer(self):
        if self._kind == "hf":
            return HFTokenizer(Path(str(self.path) + ".tokenizer"))
        from tpi.formats.gguf import open_gguf  # the gguf package loads only for a GGUF-tokenized model

        vocab = Path(str(self.path) + VOCAB_SUFFIX)
        if not vocab.is_file():
            raise ModelFormatError(f"{vocab} is missing; it is written by tpi convert beside the model")
        return LlamaCppTokenizer(vocab, open_gguf(vocab).value)
