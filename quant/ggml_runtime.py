"""The ggml CPU backend as tpi runs it: a persistent threadpool, and never more threads than cores."""
from __future__ import annotations

import ctypes as C
import logging
import os
import time
import weakref

from tpi.errors import TpiError
from tpi.quant.ggml_lib import STATUS_SUCCESS, load_ggml

log = logging.getLogger(__name__)


class GgmlComputeError(TpiError):
    """ggml returned an error status from a graph computation."""


def _free_runtime(lib, backend: int, pool: int | None) -> None:
    lib.ggml_backend_free(backend)
    if pool:
        lib.ggml_threadpool_free(pool)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores(window_s: float = 0.1) -> int:
    """Cores left idle by the rest of the machine, measured over `window_s` (/proc/stat; at least 1).

    Where the OS does not say, every usable core counts as idle.
    """
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # idle + iowait, all

    cores = usable_cores()
    try:
        idle0, total0 = sample()
        time.sleep(window_s)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return cores
    share = (idle1 - idle0) / max(1, total1 - total0)  # over every core of the machine
    return max(1, min(cores, int(share * (os.cpu_count() or cores) + 0.5)))


class CpuRuntime:
    """The ggml CPU backend with a persistent threadpool (without one, every compute mallocs threads).

    ggml's workers meet at a barrier after every op and spin there: a thread that has to share its
    core stalls every op of every graph (measured on SmolLM2 with the machine's 2 cores busy: 130-190
    ms a token on 2 threads against 30 ms on 1). So a requested count is capped at the usable cores,
    and with none requested the runtime takes the cores idle right now.
    """

    def __init__(self, threads: int | None = None, lib=None):
        self.lib = lib or load_ggml()
        cores = usable_cores()
        self.threads = max(1, min(threads, cores)) if threads else idle_cores()
        if threads and self.threads > 1 and (idle := idle_cores()) < self.threads:
            log.warning("ggml: %d threads asked for, but only %d core(s) are idle now; its threads spin at "
                        "every op, so expect slow steps while the machine stays this busy", self.threads, idle)
        self.backend = self.lib.ggml_backend_cpu_init()
        if not self.backend:
            raise GgmlComputeError("ggml could not start its CPU backend")
        self.lib.ggml_backend_cpu_set_n_threads(self.backend, self.threads)
        params = self.lib.ggml_threadpool_params_default(self.threads)
        self.pool = self.lib.ggml_threadpool_new(C.byref(params))
        if self.pool:
            self.lib.ggml_backend_cpu_set_threadpool(self.backend, self.pool)
        self._finalizer = weakref.finalize(self, _free_runtime, self.lib, self.backend, self.pool)
        self._compute = self.lib.ggml_backend_graph_compute

    def compute(self, graph) -> None:
        status = self._compute(self.backend, graph.ptr)
        if status != STATUS_SUCCESS:
            raise GgmlComputeError(f"ggml graph computation failed with status {status}")

    def close(self) -> None:
        self._finalizer()
