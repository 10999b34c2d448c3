"""tpi's native model file: a one-rank shard store plus the tokenizer, written by `tpi convert`.

OUT.tpis holds every block as a rank of a group of one cuts them (GGUF types kept as they are;
q|k|v and gate|up fused where their types agree, else apart); OUT.tpis.vocab.gguf is a weightless GGUF carrying the original
metadata, so llama.cpp's tokenizer and the chat template come along. Opening OUT.tpis gives a
source with canonical tensor names again, so it can be split for any group size.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tpi.config import ModelConfig, config_from_dict, config_to_dict
from tpi.errors import ModelFormatError

NATIVE_FORMAT = "tpi-native-2"  # 2: GGUF-typed blocks, q|k|v and gate|up possibly unfused
READABLE_FORMATS = ("tpi-native-1", NATIVE_FORMAT)  # 1: q4g32 / q8 / bf16 blocks, always fused
VOCAB_SUFFIX = ".vocab.gguf"


def _copy_metadata(reader, out: Path) -> None:
    """Write a GGUF with the source's key/values and no tensors (tokenizer and hyperparameters)."""
    import gguf

    from tpi.formats.gguf_file import GGUFArray

    w = gguf.GGUFWriter(out, reader.value("general.architecture"))
    for key, raw in reader.metadata.items():
        if key == "general.architecture":
            continue
        if isinstance(raw, GGUFArray):
            if raw.count:  # gguf cannot write an empty array
                sub_type = None if raw.elem_type == gguf.GGUFValueType.ARRAY else gguf.GGUFValueType(raw.elem_type)
                w.add_key_value(key, reader.value(key), gguf.GGUFValueType.ARRAY, sub_type)
        else:
            w.add_key_value(key, raw, gguf.GGUFValueType(reader.value_types[key]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def convert(source, out: Path, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write `source` as native files; returns the per-tensor import notes."""
    from tpi.devices.slicing import plan_shards
    from tpi.scheduler.store import write_store
    from tpi.shard import block_keys, iter_rank_blocks

    cfg = source.config
    (shard,) = plan_shards(cfg, [1.0])
    total = len(block_keys(cfg.n_layers))

    def blocks():
        for i, (key, (blk,)) in enumerate(iter_rank_blocks(source, cfg, [shard]), start=1):
            if progress:
                progress(key, i, total)
            yield key, blk

    if source.kind not in ("gguf", "hf"):
        raise ModelFormatError(f"{source.path} is already a converted tpi model")
    meta = {"format": NATIVE_FORMAT, "config": config_to_dict(cfg), "tokenizer": source.kind}
    write_store(out, meta, blocks())
    if source.kind == "gguf":
        _copy_metadata(source.reader, Path(str(out) + VOCAB_SUFFIX))
    else:
        import shutil

        folder = Path(str(out) + ".tokenizer")
        folder.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (source.path / name).is_file():
                shutil.copy(source.path / name, folder / name)
    return dict(source.notes)


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
            from tpi.tokenizer import HFTokenizer

            return HFTokenizer(Path(str(self.path) + ".tokenizer"))
        from tpi.formats.gguf import open_gguf
        from tpi.tokenizer import LlamaCppTokenizer

        vocab = Path(str(self.path) + VOCAB_SUFFIX)
        if not vocab.is_file():
            raise ModelFormatError(f"{vocab} is missing; it is written by tpi convert beside the model")
        return LlamaCppTokenizer(vocab, open_gguf(vocab).value)
