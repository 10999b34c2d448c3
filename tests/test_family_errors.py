"""What tpi refuses among the issue-19 families, each as one `error:` line naming the problem and the fix:
Phi-3 LongRoPE (128k) and partial rotary (Phi-4-mini) GGUFs, which llama.cpp itself loads and runs, and
Hugging Face folders of the families tpi reads from GGUF only. (An unknown GGUF architecture:
tests/test_cli_engine.py::test_unknown_architecture_is_one_clear_line.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from family_models import FAMILY_VARIANTS, write_family_gguf
from tpi.cli import app

llama_cpp = pytest.importorskip("llama_cpp")

# What `tpi run` of every family names when it refuses an unknown architecture.
FAMILIES = ("gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3")


def one_error_line(model, tmp, *extra: str) -> str:
    """The single `error:` line of a `tpi run` that must refuse the model (exit code 1, no traceback)."""
    result = CliRunner().invoke(app, ["run", str(model), "-p", "hi", "-n", "1", "--cache-dir", str(tmp / "cache"),
                                      "--config-dir", str(tmp / "config"), *extra])
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def llama_cpp_runs(path) -> None:
    """The refused file is a real model of its architecture: llama.cpp loads it and computes finite logits."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        ids = llm.tokenize(b"hello there", add_bos=True)
        llm.eval(ids)
        assert np.isfinite(llm.scores[: len(ids)]).all() and np.abs(llm.scores[len(ids) - 1]).max() > 0
    finally:
        llm.close()


def test_phi3_long_rope_is_refused_in_one_line(tmp_path):
    # Phi-3-mini-128k: rope_factors_long / _short and original_context_length 4096 of 131072
    path = write_family_gguf(tmp_path / "phi3_128k.gguf", **FAMILY_VARIANTS["phi3"], long_rope=True, context=131072)
    llama_cpp_runs(path)
    line = one_error_line(path, tmp_path)
    assert "LongRoPE" in line and "rope_factors_long" in line and "use the 4k variant" in line


def test_phi3_partial_rotary_is_refused_in_one_line(tmp_path):
    # Phi-4-mini (arch phi3) rotates 3/4 of each head: rope.dimension_count 48 of head_dim 64 here
    path = write_family_gguf(tmp_path / "phi3_partial.gguf", **FAMILY_VARIANTS["phi3"], rope_dims=48)
    llama_cpp_runs(path)
    line = one_error_line(path, tmp_path)
    assert "partial rotary" in line and "48 of head_dim 64" in line and "rotates whole heads" in line


def hf_folder(tmp, model_type: str):
    """A Hugging Face folder: config.json and one safetensors file (the weights do not matter here)."""
    from safetensors.numpy import save_file

    folder = tmp / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 64}))
    save_file({"model.embed_tokens.weight": np.zeros((8, 64), np.float32)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text", "phi3"])
def test_hf_folder_of_a_gguf_only_family_says_to_convert(model_type, tmp_path):
    line = one_error_line(hf_folder(tmp_path, model_type), tmp_path)
    assert f"reads {model_type} models from GGUF files only" in line and "convert_hf_to_gguf.py" in line


def test_hf_folder_of_an_unknown_family_names_what_tpi_runs(tmp_path):
    line = one_error_line(hf_folder(tmp_path, "bert"), tmp_path)
    assert "unknown model architecture 'bert'" in line
    assert all(arch in line for arch in FAMILIES), line


@pytest.mark.parametrize("extra", [("--backend", "torch"), ("--backend", "torch", "--local-workers", "1")])
def test_the_torch_backend_refuses_the_new_families_before_any_device_waits(extra, family_gguf, tmp_path):
    line = one_error_line(family_gguf("qwen3"), tmp_path, *extra)
    assert "torch backend does not run qwen3 models" in line and "--backend ggml" in line


def test_a_torch_only_device_is_left_out_of_a_group_running_a_torch_less_family():
    """`--backend torch` computes llama, mistral and qwen2 only: a joiner that offers torch is refused, with
    the fix, while the master plans the rest; for qwen2 the same device is planned."""
    from dataclasses import replace

    from test_plan_group import LAN, PARAMS, QWEN7, profile
    from tpi.devices.group_plan import Candidate, plan_real_group

    ggml = replace(profile("desk", 100), backend="ggml")
    cands = [Candidate("phone", profile("phone", 100).to_dict(), LAN), Candidate("desk", ggml.to_dict(), LAN)]
    real = plan_real_group(replace(QWEN7, arch="qwen3"), ggml, None, cands, PARAMS)
    (index, reason), = real.refused
    assert index == 0 and "torch backend does not run qwen3" in reason and "join with --backend ggml" in reason
    assert real.ranks == (1,)
    assert plan_real_group(QWEN7, ggml, None, cands, PARAMS).refused == ()
