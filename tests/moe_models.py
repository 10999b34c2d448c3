"""Qwen3-MoE fixtures: the tiny family files (family_models) cut by tpi's loader with either expert
placement, and a variant whose attention output projection is zero.

With attn_output = 0 every attention block adds exactly 0 to the residual in llama.cpp and in tpi
alike, so the logits depend only on the MoE MLPs, the norms and the output: the MoE path compared
with llama.cpp's bit for bit, whatever attention does.
"""
from __future__ import annotations

from pathlib import Path

import gguf

from family_models import FAMILY_VARIANTS, FamilySpec, family_tokenizer, random_family_tensors, write_family_metadata
from ggml_source import ModelBlocks
from model_factory import finish_gguf


def write_moe_gguf(path: Path, name: str, zero_attention: bool = False) -> Path:
    """FAMILY_VARIANTS[name] (a qwen3moe variant) as an F32 GGUF; attn_output zeroed on request."""
    spec = FamilySpec(**FAMILY_VARIANTS[name])
    assert spec.arch == "qwen3moe", name
    tensors = random_family_tensors(spec)
    if zero_attention:
        for key, t in tensors.items():
            if key.endswith("attn_output.weight"):
                t[:] = 0.0
    writer = gguf.GGUFWriter(path, spec.arch)
    writer.add_name(f"tiny-{name}{'-zero-attention' if zero_attention else ''}")
    write_family_metadata(writer, spec)
    finish_gguf(writer, family_tokenizer(spec.arch, spec.vocab), tensors, "F32", keep_f32=("ffn_gate_inp.weight",))
    return path


def moe_blocks(path: Path | str, ratios=(1.0,), placement: str | None = None) -> ModelBlocks:
    """The model cut for `ratios` as a group cuts it, its experts placed `placement` ("split" or
    "whole"; None: the planner's choice)."""
    from tpi.devices.experts import split_experts
    from tpi.devices.group_plan import weight_profile_of
    from tpi.devices.slicing import plan_cuts
    from tpi.formats import open_model
    from tpi.master.shard import iter_rank_blocks

    source = open_model(str(path))
    cfg, profile = source.config, weight_profile_of(source)
    experts = None if placement is None else split_experts(cfg, tuple(ratios), placement, profile.down_block)
    shards = plan_cuts(cfg, tuple(ratios), profile.wo_block, profile.down_block, experts=experts).shards
    blocks: list[dict[str, dict]] = [{} for _ in shards]
    for key, per_rank in iter_rank_blocks(source, cfg, shards):
        for mine, block in zip(blocks, per_rank):
            mine[key] = block
    return ModelBlocks(source, shards, blocks, blocks[0]["globals"].pop("embed"))
