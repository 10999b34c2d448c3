"""ctypes bindings to ggml, the kernel library inside llama.cpp, from llama-cpp-python's own copies.

The libraries (libggml-base, libggml-cpu) are found through `importlib.util.find_spec("llama_cpp")`
without importing llama_cpp (which would load libllama too). At load the ggml version is checked
against SUPPORTED_VERSIONS and the few ABI facts this module relies on (the leading fields of
struct ggml_tensor, the block sizes of every weight type) are probed; anything unexpected becomes
one GgmlUnavailableError naming the fix, never a crash.

Every ggml entry point GGML_ASSERTs its arguments and abort()s the process on a failed assert, so
nothing here is called with unchecked input: tpi.quant.ggml_graph validates before each call.
Signatures follow ggml/include/{ggml.h, ggml-alloc.h, ggml-backend.h, ggml-cpu.h} of ggml 0.25.3
(commit 0c1e570, llama-cpp-python 0.3.36). All pointers are opaque c_void_p.
"""
from __future__ import annotations

import ctypes as C
import functools
import importlib.util
import logging
import sys
from pathlib import Path

from tpi.errors import TpiError, pip_install

log = logging.getLogger(__name__)

# [lowest, first unsupported): the ggml minor series these bindings were written and tested against.
# 0.25 changed GGML_PREC_F32 to 10 (flash attention aborts on any other value), so older ggml is refused.
SUPPORTED_VERSIONS = ((0, 25, 0), (0, 26, 0))
INSTALL_FIX = f"{pip_install('worker-fast')} (llama-cpp-python 0.3.36 ships ggml 0.25.3)"

P = C.c_void_p
_i64, _i32, _f32, _sz, _bool = C.c_int64, C.c_int, C.c_float, C.c_size_t, C.c_bool

# ggml_type ids (ggml.h enum ggml_type) with (elements per block, bytes per block) as GGUF stores them.
TYPES = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "IQ4_NL": (20, 32, 18),
    "BF16": (30, 1, 2), "I32": (26, 1, 4), "I64": (27, 1, 8),
}
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, IQ4_NL, BF16, I32, I64 = (TYPES[n][0] for n in (
    "F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "IQ4_NL", "BF16", "I32", "I64"))
TYPE_NAMES = {tid: name for name, (tid, _, _) in TYPES.items()}
# Weight types a mul_mat may take as its first operand on the CPU backend.
MATMUL_TYPES = frozenset(TYPES[n][0] for n in TYPES if n not in ("I32", "I64"))
ROPE_NORMAL, ROPE_NEOX = 0, 2  # rotate adjacent pairs / the two halves of a head
PREC_F32 = 10  # enum ggml_prec in 0.25 (it was 1 before)
STATUS_SUCCESS = 0
MAX_DIMS = 4
MAX_THREADS = 512  # GGML_MAX_N_THREADS: length of the threadpool cpumask


class GgmlUnavailableError(TpiError):
    """ggml cannot be used here: missing, another version, or an unexpected build."""


class InitParams(C.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", _sz), ("mem_buffer", P), ("no_alloc", _bool)]


class TensorHead(C.Structure):  # the leading fields of struct ggml_tensor (unchanged since 2023)
    _fields_ = [("type", C.c_int), ("buffer", P), ("ne", _i64 * MAX_DIMS), ("nb", _sz * MAX_DIMS)]


class ThreadpoolParams(C.Structure):  # struct ggml_threadpool_params
    _fields_ = [("cpumask", _bool * MAX_THREADS), ("n_threads", C.c_int), ("prio", C.c_int),
                ("poll", C.c_uint32), ("strict_cpu", _bool), ("paused", _bool)]


LOG_CALLBACK = C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)  # ggml_log_callback


def _forward_log(level: int, text: bytes | None, _user: int | None) -> None:
    """ggml's own messages (repack notices, allocator warnings) go to logging, not straight to stderr."""
    if text:
        log.log(logging.WARNING if level >= 3 else logging.DEBUG, "ggml: %s", text.decode(errors="replace").rstrip())


# name -> (library, restype, argtypes). "base" is libggml-base, "cpu" libggml-cpu.
_SIGNATURES = {
    "ggml_version": ("base", C.c_char_p, ()),
    "ggml_commit": ("base", C.c_char_p, ()),
    "ggml_blck_size": ("base", _i64, (_i32,)),
    "ggml_type_size": ("base", _sz, (_i32,)),
    "ggml_row_size": ("base", _sz, (_i32, _i64)),
    "ggml_init": ("base", P, (InitParams,)),
    "ggml_free": ("base", None, (P,)),
    "ggml_tensor_overhead": ("base", _sz, ()),
    "ggml_graph_overhead_custom": ("base", _sz, (_sz, _bool)),
    "ggml_new_tensor_1d": ("base", P, (P, _i32, _i64)),
    "ggml_new_tensor_2d": ("base", P, (P, _i32, _i64, _i64)),
    "ggml_new_tensor_3d": ("base", P, (P, _i32, _i64, _i64, _i64)),
    "ggml_nbytes": ("base", _sz, (P,)),
    "ggml_get_data": ("base", P, (P,)),
    "ggml_set_input": ("base", None, (P,)),
    "ggml_set_output": ("base", None, (P,)),
    # ops: (ctx, operands..., scalars...) -> tensor
    "ggml_rms_norm": ("base", P, (P, P, _f32)),
    "ggml_mul": ("base", P, (P, P, P)),
    "ggml_add": ("base", P, (P, P, P)),
    "ggml_mul_mat": ("base", P, (P, P, P)),
    "ggml_rope_ext": ("base", P, (P, P, P, P, _i32, _i32, _i32, _f32, _f32, _f32, _f32, _f32, _f32)),
    "ggml_reshape_2d": ("base", P, (P, P, _i64, _i64)),
    "ggml_reshape_3d": ("base", P, (P, P, _i64, _i64, _i64)),
    "ggml_view_1d": ("base", P, (P, P, _i64, _sz)),
    "ggml_view_2d": ("base", P, (P, P, _i64, _i64, _sz, _sz)),
    "ggml_view_3d": ("base", P, (P, P, _i64, _i64, _i64, _sz, _sz, _sz)),
    "ggml_permute": ("base", P, (P, P, _i32, _i32, _i32, _i32)),
    "ggml_cont": ("base", P, (P, P)),
    "ggml_concat": ("base", P, (P, P, P, _i32)),
    "ggml_set_rows": ("base", P, (P, P, P, P)),
    "ggml_get_rows": ("base", P, (P, P, P)),
    "ggml_flash_attn_ext": ("base", P, (P, P, P, P, P, _f32, _f32, _f32)),
    "ggml_prec_set_acc": ("base", _bool, (P, _i32)),
    "ggml_swiglu": ("base", P, (P, P)),
    "ggml_swiglu_split": ("base", P, (P, P, P)),
    "ggml_geglu": ("base", P, (P, P)),
    "ggml_geglu_split": ("base", P, (P, P, P)),
    "ggml_scale": ("base", P, (P, P, _f32)),
    "ggml_tanh": ("base", P, (P, P)),
    # mixture of experts (llama.cpp's build_moe_ffn)
    "ggml_mul_mat_id": ("base", P, (P, P, P, P)),
    "ggml_soft_max": ("base", P, (P, P)),
    "ggml_argsort_top_k": ("base", P, (P, P, _i32)),
    "ggml_get_rows": ("base", P, (P, P, P)),
    "ggml_sum_rows": ("base", P, (P, P)),
    "ggml_clamp": ("base", P, (P, P, _f32, _f32)),
    "ggml_div": ("base", P, (P, P, P)),
    # graphs and allocation
    "ggml_new_graph_custom": ("base", P, (P, _sz, _bool)),
    "ggml_build_forward_expand": ("base", None, (P, P)),
    "ggml_graph_n_nodes": ("base", _i32, (P,)),
    "ggml_gallocr_new": ("base", P, (P,)),
    "ggml_gallocr_free": ("base", None, (P,)),
    "ggml_gallocr_reserve": ("base", _bool, (P, P)),
    "ggml_gallocr_alloc_graph": ("base", _bool, (P, P)),
    "ggml_gallocr_get_buffer_size": ("base", _sz, (P, _i32)),
    "ggml_backend_cpu_buffer_type": ("base", P, ()),
    "ggml_backend_cpu_buffer_from_ptr": ("base", P, (P, _sz)),
    "ggml_backend_buffer_free": ("base", None, (P,)),
    "ggml_backend_buffer_get_base": ("base", P, (P,)),
    "ggml_backend_buft_alloc_buffer": ("base", P, (P, _sz)),
    "ggml_backend_tensor_alloc": ("base", _i32, (P, P, P)),
    "ggml_backend_tensor_set": ("base", None, (P, P, _sz, _sz)),
    "ggml_backend_alloc_ctx_tensors_from_buft": ("base", P, (P, P)),
    "ggml_backend_buft_name": ("base", C.c_char_p, (P,)),
    "ggml_backend_reg_dev_get": ("base", P, (P, _sz)),
    "ggml_backend_reg_get_proc_address": ("base", P, (P, C.c_char_p)),
    "ggml_backend_graph_compute": ("base", _i32, (P, P)),
    "ggml_backend_free": ("base", None, (P,)),
    "ggml_threadpool_params_default": ("base", ThreadpoolParams, (_i32,)),
    "ggml_backend_cpu_init": ("cpu", P, ()),
    "ggml_backend_cpu_set_n_threads": ("cpu", None, (P, _i32)),
    "ggml_backend_cpu_set_threadpool": ("cpu", None, (P, P)),
    "ggml_backend_cpu_reg": ("cpu", P, ()),
    "ggml_threadpool_new": ("cpu", P, (C.POINTER(ThreadpoolParams),)),
    "ggml_threadpool_free": ("cpu", None, (P,)),
    "ggml_cpu_has_avx2": ("cpu", _i32, ()),
    "ggml_log_set": ("base", None, (LOG_CALLBACK, P)),
}


class GgmlLib:
    """The two loaded libraries, every bound function as an attribute, and what the probes found."""

    def __init__(self, base: C.CDLL, cpu: C.CDLL, directory: Path):
        self.directory = directory
        libs = {"base": base, "cpu": cpu}
        missing = []
        for name, (lib, restype, argtypes) in _SIGNATURES.items():
            fn = getattr(libs[lib], name, None) or getattr(libs["base" if lib == "cpu" else "cpu"], name, None)
            if fn is None:
                missing.append(name)
                continue
            fn.restype, fn.argtypes = restype, list(argtypes)
            setattr(self, name, fn)
        if missing:
            raise GgmlUnavailableError(
                f"the ggml in {directory} lacks {', '.join(missing[:4])}: it is not a version tpi supports; {INSTALL_FIX}")
        self.version = self.ggml_version().decode()
        self.commit = self.ggml_commit().decode()
        self.tensor_overhead = int(self.ggml_tensor_overhead())
        self.has_avx2 = bool(self.ggml_cpu_has_avx2())
        self._log_callback = LOG_CALLBACK(_forward_log)  # kept: ggml holds only the C pointer
        self.ggml_log_set(self._log_callback, None)

    @staticmethod
    def head(tensor: int) -> TensorHead:
        """The type / ne / nb fields of a ggml tensor (read in place)."""
        return TensorHead.from_address(tensor)

    def describe(self) -> str:
        return f"ggml {self.version} ({self.commit}) from {self.directory}"


def parse_version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in text.strip().split("-")[0].split("."))
    except ValueError:
        return None


def version_supported(text: str) -> bool:
    v = parse_version(text)
    lo, hi = SUPPORTED_VERSIONS
    return v is not None and len(v) == 3 and lo <= v < hi


def _library_names(stem: str) -> list[str]:
    if sys.platform == "win32":
        return [f"{stem}.dll", f"lib{stem}.dll"]
    if sys.platform == "darwin":
        return [f"lib{stem}.dylib"]
    return [f"lib{stem}.so"]


def library_dir() -> Path:
    """Where llama-cpp-python keeps its ggml libraries; GgmlUnavailableError if it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    if spec is None or not spec.origin:
        raise GgmlUnavailableError(f"llama-cpp-python is not installed, so ggml is not available; {INSTALL_FIX}")
    return Path(spec.origin).parent / "lib"


def _open(directory: Path, stem: str) -> C.CDLL:
    for name in _library_names(stem):
        path = directory / name
        if path.exists():
            try:
                return C.CDLL(str(path))
            except OSError as e:
                raise GgmlUnavailableError(f"cannot load {path} ({e}); reinstall with {INSTALL_FIX}") from None
    raise GgmlUnavailableError(f"no {stem} library in {directory}: this llama-cpp-python build does not ship "
                               f"ggml as a shared library; {INSTALL_FIX}")


def _probe_abi(lib: GgmlLib) -> None:
    """Check the layout facts the bindings rely on, on a throwaway metadata-only context."""
    for name, (tid, block, block_bytes) in TYPES.items():
        got = (int(lib.ggml_blck_size(tid)), int(lib.ggml_type_size(tid)))
        if got != (block, block_bytes):
            raise GgmlUnavailableError(
                f"{lib.describe()} says {name} blocks are {got} (elements, bytes), tpi expects "
                f"{(block, block_bytes)}: unsupported ggml build; {INSTALL_FIX}")
    ctx = lib.ggml_init(InitParams(4 * lib.tensor_overhead, None, True))
    if not ctx:
        raise GgmlUnavailableError(f"{lib.describe()} could not create a context; {INSTALL_FIX}")
    try:
        t = lib.ggml_new_tensor_2d(ctx, F16, 6, 5)
        h = lib.head(t)
        if (h.type, tuple(h.ne), tuple(h.nb)) != (F16, (6, 5, 1, 1), (2, 12, 60, 60)) or lib.ggml_nbytes(t) != 60:
            raise GgmlUnavailableError(
                f"{lib.describe()} lays out struct ggml_tensor differently than tpi expects; {INSTALL_FIX}")
    finally:
        lib.ggml_free(ctx)


@functools.cache
def load_ggml() -> GgmlLib:
    """The ggml libraries, loaded and checked once per process; GgmlUnavailableError otherwise."""
    directory = library_dir()
    base = _open(directory, "ggml-base")  # first: libggml-cpu resolves its symbols against it
    cpu = _open(directory, "ggml-cpu")
    lib = GgmlLib(base, cpu, directory)
    if not version_supported(lib.version):
        lo, hi = (".".join(map(str, v)) for v in SUPPORTED_VERSIONS)
        raise GgmlUnavailableError(
            f"{lib.describe()} is not supported: tpi needs ggml >= {lo}, < {hi}; {INSTALL_FIX}")
    _probe_abi(lib)
    log.debug("using %s", lib.describe())
    return lib


def ggml_available() -> tuple[bool, str]:
    """(True, description) when ggml loads and passes its checks here, else (False, the reason)."""
    try:
        return True, load_ggml().describe()
    except GgmlUnavailableError as e:
        return False, str(e)
