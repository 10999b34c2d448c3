"""Which kernel backend a device runs (ggml, numpy, torch) and the layers object that computes with it."""
from __future__ import annotations

import importlib.util

from tpi.errors import TpiError, pip_install
from tpi.quant.kernels import backend_available

AUTO_BACKENDS = ("ggml", "numpy")  # what --backend auto tries, best first; torch only when asked by name
BACKEND_EXTRAS = {"ggml": "worker-fast", "torch": "all"}  # the pip extra that brings each optional backend
TORCH_ARCHS = ("llama", "mistral", "qwen2")  # the families TorchLayers computes; ggml and numpy run them all


def resolve_backend(requested: str) -> str:
    """'auto' -> the first of AUTO_BACKENDS this device can load; a named backend, checked that it loads."""
    if requested == "auto":
        return next(b for b in AUTO_BACKENDS if backend_available(b))  # numpy is always there
    if backend_available(requested):
        return requested
    if requested in BACKEND_EXTRAS:
        raise TpiError(f"the {requested} backend cannot run here: {_why_missing(requested)}; or use --backend auto")
    raise TpiError(f"unknown backend '{requested}'; use auto, {', '.join(sorted(set(AUTO_BACKENDS) | set(BACKEND_EXTRAS)))}")


def _why_missing(backend: str) -> str:
    module = {"ggml": "llama_cpp"}.get(backend, backend)
    if importlib.util.find_spec(module) is not None:
        return f"{backend} did not load from the installed {module} (see the log)"
    return f"{backend} is not installed; {pip_install(BACKEND_EXTRAS[backend])} adds it"


def backend_choice_note(requested: str, chosen: str) -> str:
    """One line saying which backend this device runs, and what a better one would need."""
    if requested != "auto":
        return f"kernel backend: {chosen} (--backend {requested})"
    notes = [_why_missing(b) for b in AUTO_BACKENDS[: AUTO_BACKENDS.index(chosen)]]
    return f"kernel backend: {chosen} ({'; '.join(['auto', *notes])})"


def backend_refusal(backend: str, arch: str) -> str | None:
    """Why a backend cannot run an architecture's models, or None when it can."""
    if backend == "torch" and arch not in TORCH_ARCHS:
        return (f"the torch backend does not run {arch} models (it runs {', '.join(TORCH_ARCHS)}); "
                "use --backend ggml (the default) or --backend numpy")
    return None


def check_runs(backend: str, arch: str) -> None:
    """TpiError naming the fix when a (resolved) backend cannot run an architecture."""
    why = backend_refusal(backend, arch)
    if why:
        raise TpiError(why)


def make_layers(backend: str, cfg, shard, context: int, threads: int | None, slots: int = 1):
    """The per-block maths for a backend: the one place that picks ggml, torch or numpy.

    slots: KV caches of `context` positions each (sequences run at once; torch runs one).
    """
    backend = resolve_backend(backend)
    if backend == "ggml":
        from tpi.quant.ggml_lib import load_ggml  # each backend's layers load only when chosen (torch: ~1 s)

        load_ggml()  # GgmlUnavailableError (a TpiError naming the fix) when ggml cannot run here
        from tpi.model.layers_ggml import GgmlLayers  # (loaded only when chosen)

        return GgmlLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, context, threads, slots=slots,
                          experts=shard.expert_share(cfg))
    check_runs(backend, cfg.arch)
    if backend == "torch":
        try:
            from tpi.model.layers_torch import TorchLayers  # (loaded only when chosen)
        except ImportError:
            raise TpiError(f"torch is not installed; install the full engine with {pip_install('all')}") from None
        return TorchLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, context, threads, slots=slots)
    if backend == "numpy":
        from tpi.model.layers_numpy import NumpyLayers  # (loaded only when chosen)

        return NumpyLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, context, threads, slots=slots,
                           experts=shard.expert_share(cfg))
    raise TpiError(f"unknown backend '{backend}'; use ggml, torch or numpy")

