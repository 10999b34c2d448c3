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

from tpi.model.config import ModelConfig, config_from_dict
from tpi.errors import ModelFormatError

NATIVE_FORMAT = "tpi-native-2"  # 2: GGUF-typed blocks, q|k|v and gate|up possibly unfused
READABLE_FORMATS = ("tpi-native-1", NATIVE_FORMAT)  # 1: q4g32 / q8 / bf16 blocks, always fused
VOCAB_SUFFIX = ".vocab.gguf"


class NativeSource:
    """A converted model: canonical tensors are sliced back out of the fused blocks."""

    kind = "native"

    def __init__(self, path: Path):
        from tpi.scheduler.store import ShardStore

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
        from tpi.quant.formats import slice_rows

        cfg = self.config
        if not name.startswith("layers."):
            g = self._block("globals")
            if name == "lm_head" and "lm_head" not in g:
                raise ModelFormatError(f"{self.path}: lm_head is missing")
            return g["embed" if name == "embed" else name]
        _, i, short = name.split(".", 2)
        qd, kd, inter = cfg.q_dim, cfg.kv_dim, cfg.intermediate
        if short in ("attn_norm", "wo"):
            return self._block(f"L{i}.attn")[short]
        if short in ("mlp_norm",):
            return self._block(f"L{i}.mlp")[short]
        if short == "w_down":
            return self._block(f"L{i}.mlp")["wdown"]
        if short in ("w_gate", "w_up"):
            mlp = self._block(f"L{i}.mlp")
            if "wgu" not in mlp:  # kept apart: gate and up differ in type
                return mlp["wgate" if short == "w_gate" else "wup"]
            a = 0 if short == "w_gate" else inter
            return slice_rows(mlp["wgu"], a, a + inter)
        attn = self._block(f"L{i}.attn")
        if short in attn:  # wq / wk / wv kept apart
            return attn[short]
        fused = attn["bqkv" if short.startswith("b") else "wqkv"]
        start, stop = {"q": (0, qd), "k": (qd, qd + kd), "v": (qd + kd, qd + 2 * kd)}[short[1]]
        if isinstance(fused, np.ndarray):
            return fused[start:stop]
        return slice_rows(fused, start, stop)

    def weight_fmt(self, name: str) -> str:
        """The fmt of a matrix as stored (read from the index; no weight bytes are touched)."""
        return self.load(name).fmt

    def tokenizer(self):
        if self._kind == "hf":
            from tpi.model.tokenizer import HFTokenizer

            return HFTokenizer(Path(str(self.path) + ".tokenizer"))
        from tpi.formats.gguf import open_gguf
        from tpi.model.tokenizer import LlamaCppTokenizer

        vocab = Path(str(self.path) + VOCAB_SUFFIX)
        if not vocab.is_file():
            raise ModelFormatError(f"{vocab} is missing; it is written by tpi convert beside the model")
        return LlamaCppTokenizer(vocab, open_gguf(vocab).value)
