"""`tpi convert`: cut a model as a group of one would and write it as tpi's native file (GGUF types kept)."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tpi.devices.slicing import plan_shards
from tpi.errors import ModelFormatError
from tpi.formats.native import NATIVE_FORMAT, VOCAB_SUFFIX
from tpi.master.shard import iter_rank_blocks
from tpi.model.blocks import block_keys
from tpi.model.config import config_to_dict
from tpi.scheduler.store import write_store


def _copy_metadata(reader, out: Path) -> None:
    """Write a GGUF with the source's key/values and no tensors (tokenizer and hyperparameters)."""
    # The gguf package (~0.3 s to import) is needed only to write a GGUF model's vocabulary file.
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
        folder = Path(str(out) + ".tokenizer")
        folder.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (source.path / name).is_file():
                shutil.copy(source.path / name, folder / name)
    return dict(source.notes)
