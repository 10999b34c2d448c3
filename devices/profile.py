"""Measure a device (matmul throughput, memory bandwidth, disk, memory) and carry it over the wire."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import socket
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tpi.errors import ProtocolError
from tpi.scheduler.overhead import runtime_overhead_bytes

log = logging.getLogger(__name__)

BACKENDS = ("torch", "numpy", "ggml")  # kernel backends a profile may name (tpi.quant.kernels)
GROUP = 32
CACHE_FILE = "device_profile.json"
CACHE_MAX_AGE_S = 7 * 24 * 3600.0  # a week: hardware rarely changes, free memory is re-read on use
MAX_BENCH_WEIGHTS = 8 << 20  # cap one bench matmul at 8M weights (16 MB bf16) to stay well under 3 s
# Representative decode matmul shapes (N, K): big enough to leave cache, small enough for < 3 s.
DEFAULT_BENCH_SHAPES: tuple[tuple[int, int], ...] = ((2048, 2048), (4096, 1024))
ProgressFn = Callable[[str, float], None]


@dataclass(frozen=True)
class DeviceProfile:
    """What the planner needs to know about one device; sent in the join handshake."""

    name: str
    os: str
    cores: int
    total_memory_bytes: int
    free_memory_bytes: int
    backend: str  # "ggml" | "numpy" | "torch": what the device chose (tpi.model.backends.resolve_backend), and what
    # the figures below measured (its own kernels)
    int4_gflops: float  # decode (one token) int4-weight matmul throughput
    bf16_gflops: float  # decode (one token) bf16-weight matmul throughput
    prefill_gflops: float  # many-token matmul throughput (prompt processing)
    memory_gbs: float  # memory copy bandwidth, GB/s
    disk_mb_s: float  # cold sequential read of the shard store's disk, MB/s
    measured_at: float  # unix seconds
    runtime_bytes: int = 0  # resident memory of the runtime before weights (0: unknown, the planner assumes)
    cpu_share: float = 1.0  # CPU time / wall time per compute thread while benchmarking: < 1 on a busy device

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "DeviceProfile":
        """Build from untrusted wire data; any bad field raises ProtocolError naming it."""
        if not isinstance(data, dict):
            raise ProtocolError(f"device profile must be a map, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        optional = {"runtime_bytes", "cpu_share"}  # added later: older peers may omit them
        missing = [n for n in names if n not in data and n not in optional]
        extra = [k for k in data if k not in names]
        if missing or extra:
            raise ProtocolError(
                f"device profile fields do not match (missing {missing}, unexpected {extra!r:.200}); "
                "the peer runs another tpi version: upgrade both sides to the same release"
            )
        values = {n: _check_field(n, data[n]) for n in names if n in data}
        if values["free_memory_bytes"] > values["total_memory_bytes"]:
            raise ProtocolError("device profile says free memory exceeds total memory")
        return cls(**values)


_STR_FIELDS = {"name": 128, "os": 64}
_INT_FIELDS = {"cores": (1, 4096), "total_memory_bytes": (1, 1 << 50), "free_memory_bytes": (0, 1 << 50),
               "runtime_bytes": (0, 1 << 50)}
_FLOAT_FIELDS = {  # (min exclusive-ish, max): throughputs must be positive to divide by
    "int4_gflops": (1e-6, 1e7), "bf16_gflops": (1e-6, 1e7), "prefill_gflops": (1e-6, 1e7),
    "memory_gbs": (1e-6, 1e5), "disk_mb_s": (1e-6, 1e7), "measured_at": (0.0, 1e11), "cpu_share": (0.01, 1.0),
}


def _check_field(name: str, value: Any) -> Any:
    if name in _STR_FIELDS:
        if not isinstance(value, str) or not (0 < len(value) <= _STR_FIELDS[name]) or not value.isprintable():
            raise ProtocolError(f"device profile '{name}' must be printable text of 1-{_STR_FIELDS[name]} chars")
        return value
    if name == "backend":
        if value not in BACKENDS:
            raise ProtocolError(f"device profile backend {value!r:.40} is not one of {BACKENDS}")
        return value
    if name in _INT_FIELDS:
        lo, hi = _INT_FIELDS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ProtocolError(f"device profile '{name}' must be an integer in [{lo}, {hi}], got {value!r:.40}")
        return value
    lo, hi = _FLOAT_FIELDS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"device profile '{name}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ProtocolError(f"device profile '{name}' = {value!r:.40} is outside [{lo}, {hi}]")
    return float(value)


# ---- measurement -------------------------------------------------------------------------


def _best_seconds(fn: Callable[[], Any], budget_s: float, max_reps: int = 200) -> float:
    """Fastest of as many calls as fit in budget_s (at least 2): the minimum rejects noise from other load."""
    fn()  # warm-up: first call pays allocation and page faults
    best = math.inf
    deadline = time.perf_counter() + budget_s
    for i in range(max_reps):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if i >= 1 and t1 > deadline:
            break
    return max(best, 1e-9)


def _torch_matmuls(n: int, k: int, budget_s: float) -> tuple[float, float, float]:
    """Seconds for one int4 decode, one bf16 decode and one 64-token int4 prefill matmul (the engine's kernels)."""
    import torch  # lazy: torch is optional on workers

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)  # uint8 [N, K/2]
    scale_zero = torch.rand(k // GROUP, n, 2, generator=gen).bfloat16()  # [K/G, N, 2]
    w = torch.randn(n, k, generator=gen).bfloat16()
    x1 = torch.randn(1, k, generator=gen).bfloat16()
    x64 = torch.randn(64, k, generator=gen).bfloat16()
    with torch.inference_mode():
        t4 = _best_seconds(lambda: torch._weight_int4pack_mm_for_cpu(x1, packed, GROUP, scale_zero), budget_s)
        t16 = _best_seconds(lambda: torch.nn.functional.linear(x1, w), budget_s)
        tp = _best_seconds(lambda: torch._weight_int4pack_mm_for_cpu(x64, packed, GROUP, scale_zero), budget_s)
    return t4, t16, tp


def _numpy_matmuls(n: int, k: int, budget_s: float) -> tuple[float, float, float]:
    """Same three timings for a numpy device, which dequantises weights on every call."""
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    scale = rng.random((n, k // GROUP), dtype=np.float32)
    zero = rng.random((n, k // GROUP), dtype=np.float32)
    w_bf16 = (rng.standard_normal((n, k), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    x1 = rng.standard_normal((1, k), dtype=np.float32)
    x64 = rng.standard_normal((64, k), dtype=np.float32)

    def int4() -> np.ndarray:
        q = np.empty((n, k), dtype=np.float32)
        q[:, 0::2] = packed & 0x0F
        q[:, 1::2] = packed >> 4
        q = q.reshape(n, k // GROUP, GROUP)
        w = (q - 8.0) * scale[..., None] + zero[..., None]
        return x1 @ w.reshape(n, k).T

    def bf16(x: np.ndarray) -> np.ndarray:
        return x @ (w_bf16.astype(np.uint32) << 16).view(np.float32).T

    return (_best_seconds(int4, budget_s), _best_seconds(lambda: bf16(x1), budget_s),
            _best_seconds(lambda: bf16(x64), budget_s))


def _kernel_seam_matmuls(backend: str, n: int, k: int, budget_s: float,
                         threads: int | None = None) -> tuple[float, float, float]:
    """Same three timings through tpi.quant.kernels for any other backend (ggml: its Q4_0 and BF16 kernels,
    Q4_0 repacked where ggml repacks it, on the engine's thread count)."""
    # The kernels load only to measure: a worker with a cached profile never imports them.
    from tpi.quant.formats import BF16, QTensor, f32_to_bf16_bits, quantize
    from tpi.quant.kernels import get_backend

    if backend == "ggml":
        from tpi.quant.ggml_backend import GgmlBackend  # (only to measure)

        kernels = GgmlBackend(threads=threads)
    else:
        kernels = get_backend(backend)
    rng = np.random.default_rng(0)
    if backend == "ggml":  # ggml runs the file's own block types: Q4_0 blocks are a fp16 scale + 16 nibble bytes
        blocks = rng.integers(0, 256, (n, k // 32, 18), dtype=np.uint8)
        blocks[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        int4 = QTensor("ggml:Q4_0", (n, k), {"data": blocks.reshape(n, -1)})
    else:
        int4 = quantize(rng.standard_normal((n, k), dtype=np.float32), "q4g32")
    w4 = kernels.prepare(int4)
    w16 = kernels.prepare(QTensor(BF16, (n, k), {"weight": f32_to_bf16_bits(rng.standard_normal((n, k), dtype=np.float32))}))
    to_input = getattr(kernels, "activations", lambda a: a)  # float32 (T, K) is the seam's input
    x1, x64 = (to_input(rng.standard_normal((t, k), dtype=np.float32)) for t in (1, 64))
    return (_best_seconds(lambda: w4(x1), budget_s), _best_seconds(lambda: w16(x1), budget_s),
            _best_seconds(lambda: w4(x64), budget_s))


def measure_memory_gbs(megabytes: int = 64) -> float:
    """Copy bandwidth in GB/s (bytes read plus bytes written)."""
    src = np.ones(megabytes << 17, dtype=np.float64)  # megabytes MiB
    dst = np.empty_like(src)
    seconds = _best_seconds(lambda: np.copyto(dst, src), 0.05, max_reps=5)
    return 2 * src.nbytes / seconds / 1e9


def measure_disk_mb_s(scratch_dir: Path, megabytes: int = 32) -> float:
    """Sequential read speed of a file written then dropped from the page cache, in MB/s."""
    scratch_dir.mkdir(parents=True, exist_ok=True)
    path = scratch_dir / f"tpi-disk-probe-{os.getpid()}.bin"
    chunk = np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    n_chunks = max(1, megabytes // 4)
    try:
        with open(path, "wb") as f:
            for _ in range(n_chunks):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):  # evict so we time the disk, not the page cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(len(chunk))
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        seconds = max(time.perf_counter() - t0, 1e-9)
    finally:
        path.unlink(missing_ok=True)
    return n_chunks * len(chunk) / seconds / 1e6


def memory_bytes() -> tuple[int, int]:
    """(total, free) memory, honouring a cgroup v1/v2 memory limit when one is set."""
    total = free = 0
    try:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
        total, free = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError, IndexError):
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        total = free = pages * page
    limit, usage = _cgroup_limit()
    if limit is not None and limit < total:
        total, free = limit, max(0, min(free, limit - (usage or 0)))
    return total, min(free, total)


def _cgroup_limit() -> tuple[int | None, int | None]:
    """This process's cgroup memory limit and usage, or (None, None) when unlimited/unknown."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if controllers == "":  # cgroup v2
                base = Path("/sys/fs/cgroup") / rel.lstrip("/")
                raw = (base / "memory.max").read_text().strip()
                return (None, None) if raw == "max" else (int(raw), int((base / "memory.current").read_text()))
            if "memory" in controllers.split(","):
                base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
                limit = int((base / "memory.limit_in_bytes").read_text())
                usage = int((base / "memory.usage_in_bytes").read_text())
                return (None, None) if limit >= 1 << 60 else (limit, usage)
    except (OSError, ValueError):
        pass  # no readable cgroup: fall back to the machine's memory
    return None, None


def measure_profile(shapes: Sequence[tuple[int, int]] = DEFAULT_BENCH_SHAPES, backend: str = "numpy",
                    scratch_dir: Path | str = ".", quick: bool = False,
                    progress: ProgressFn | None = None, name: str | None = None,
                    threads: int | None = None) -> DeviceProfile:
    """Measure this device; about 1-3 s (quick: well under 1 s). Shapes are (N, K) decode matmuls.

    threads: the compute threads the engine will use (torch, ggml); matmul rates are measured with them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    if backend == "torch" and threads:
        import torch  # optional: only with --backend torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure_profile(shapes, backend, scratch_dir, quick, progress, name, None)
        finally:
            torch.set_num_threads(before)
    for n, k in shapes:
        assert k % GROUP == 0 and n % 16 == 0, f"bench shape {(n, k)} must have K % 32 == 0 and N % 16 == 0"
    report = progress or (lambda _what, _frac: None)
    budget_s = 0.04 if quick else 0.2  # per kernel per shape
    bench = {"torch": _torch_matmuls, "numpy": _numpy_matmuls}.get(
        backend, lambda n, k, s: _kernel_seam_matmuls(backend, n, k, s, threads))
    flops1 = flops64 = t4 = t16 = tp = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i, (n, k) in enumerate(shapes):
        report(f"matmul {n}x{k}", i / (len(shapes) + 2))
        a, b, c = bench(n, k, budget_s)
        t4, t16, tp = t4 + a, t16 + b, tp + c
        flops1 += 2.0 * n * k
        flops64 += 2.0 * 64 * n * k
    # Other processes on a shared device take CPU time the fastest single calls never show.
    compute_threads = _compute_threads(backend, threads)
    share = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9) / compute_threads
    report("memory bandwidth", len(shapes) / (len(shapes) + 2))
    mem = measure_memory_gbs(16 if quick else 64)
    report("disk read", (len(shapes) + 1) / (len(shapes) + 2))
    disk = measure_disk_mb_s(Path(scratch_dir), 8 if quick else 32)
    total, free = memory_bytes()
    runtime = runtime_overhead_bytes()  # this process with the backend loaded, as the window plan counts it
    report("done", 1.0)
    return DeviceProfile(
        name=(name or socket.gethostname() or "device")[:128], os=f"{platform.system()} {platform.machine()}"[:64],
        cores=os.cpu_count() or 1, total_memory_bytes=total, free_memory_bytes=free, backend=backend,
        int4_gflops=flops1 / t4 / 1e9, bf16_gflops=flops1 / t16 / 1e9, prefill_gflops=flops64 / tp / 1e9,
        memory_gbs=mem, disk_mb_s=disk, measured_at=time.time(), runtime_bytes=runtime,
        cpu_share=min(1.0, max(0.05, share)),
    )


def _compute_threads(backend: str, threads: int | None = None) -> int:
    """Threads the matmul benchmark ran on (torch's intra-op pool; ggml's CpuRuntime; numpy: one)."""
    if backend == "ggml":
        from tpi.quant.ggml_runtime import usable_cores  # loads ggml: only on its backend

        return max(1, min(threads or usable_cores(), usable_cores()))
    if backend != "torch":
        return 1
    import torch  # optional: only with --backend torch

    return max(1, torch.get_num_threads())


def save_profile(profile: DeviceProfile, cache_dir: Path | str, key: str = "") -> Path:
    """Write the profile as JSON in cache_dir (one file per key); returns the file path."""
    path = Path(cache_dir) / _cache_name(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=1))
    tmp.replace(path)  # atomic: a crash never leaves half a profile
    return path


def _cache_name(key: str) -> str:
    return CACHE_FILE if not key else CACHE_FILE.replace(".json", f"-{key}.json")


def load_profile(cache_dir: Path | str, backend: str | None = None, max_age_s: float | None = None,
                 now: float | None = None, key: str = "") -> DeviceProfile | None:
    """The cached profile, or None if absent, stale, for another backend, or unreadable (logged)."""
    path = Path(cache_dir) / _cache_name(key)
    if not path.exists():
        return None
    try:
        profile = DeviceProfile.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, ProtocolError) as exc:
        log.warning("ignoring unreadable device profile cache %s (%s); measuring again", path, exc)
        return None
    if backend is not None and profile.backend != backend:
        return None
    if max_age_s is not None and (now if now is not None else time.time()) - profile.measured_at > max_age_s:
        return None
    return profile


def model_bench_shapes(cfg, world: int = 1) -> tuple[tuple[int, int], ...]:
    """One layer's decode matmuls (N, K) at a 1/world share of this model, kernel-legal and capped.

    Fused q/k/v and gate/up as the engine runs them; wo and down are reduced over the share.
    """
    def legal(n: int, k: int) -> tuple[int, int]:
        k = max(GROUP, k // GROUP * GROUP)
        n = max(16, min(n, MAX_BENCH_WEIGHTS // k) // 16 * 16)
        return n, k

    share = max(1, world)
    qkv = (cfg.q_dim + 2 * cfg.kv_dim) // share
    inter = cfg.intermediate // share
    return tuple(dict.fromkeys([legal(qkv, cfg.hidden), legal(cfg.hidden, cfg.q_dim // share),
                                legal(2 * inter, cfg.hidden), legal(cfg.hidden, inter)]))


def profile_key(backend: str, shapes: Sequence[tuple[int, int]], threads: int | None) -> str:
    """Cache key: a profile is only reused for the same backend, bench shapes and thread count."""
    text = json.dumps([backend, [list(s) for s in shapes], threads or 0])
    return f"{backend}-t{threads or 0}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def cached_or_measured(cache_dir: Path | str, *, backend: str = "numpy",
                       shapes: Sequence[tuple[int, int]] = DEFAULT_BENCH_SHAPES, threads: int | None = None,
                       name: str | None = None, refresh: bool = False, quick: bool = False,
                       progress: ProgressFn | None = None, max_age_s: float = CACHE_MAX_AGE_S) -> DeviceProfile:
    """This device's profile from the cache, or measured now (and cached); free memory is always fresh.

    refresh measures again whatever the cache holds (`tpi devices profile`).
    """
    key = profile_key(backend, shapes, threads)
    cached = None if refresh else load_profile(cache_dir, backend, max_age_s, key=key)
    if cached is None:
        cached = measure_profile(shapes, backend, cache_dir, quick, progress, name, threads)
        save_profile(cached, cache_dir, key)
    total, free = memory_bytes()
    return replace(cached, name=(name or cached.name)[:128], total_memory_bytes=total, free_memory_bytes=free)


def offered_profile(profile: DeviceProfile, memory_budget: int | None) -> DeviceProfile:
    """What a device offers the group: its profile with free memory capped by its --memory-budget."""
    if memory_budget is None:
        return profile
    return replace(profile, free_memory_bytes=max(0, min(profile.free_memory_bytes, memory_budget)))


def handshake_profile(cache_dir: Path | str, *, backend: str = "numpy", threads: int | None = None,
                      name: str | None = None, memory_budget: int | None = None,
                      profile_file: Path | str | None = None) -> dict[str, Any]:
    """The profile `tpi join` sends: from profile_file (validated), else cached or measured here.

    An empty JSON object in profile_file sends no profile (the master then cannot plan with it).
    """
    if profile_file is not None:
        try:
            data = json.loads(Path(profile_file).read_text())
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"cannot read the device profile file {profile_file} ({exc}); "
                                "write it with `tpi devices profile --json`") from exc
        if data == {}:
            return {}
        profile = DeviceProfile.from_dict(data)
    else:
        cached = load_profile(cache_dir, backend, CACHE_MAX_AGE_S, key=profile_key(backend, DEFAULT_BENCH_SHAPES, threads))
        if cached is None:
            log.info("measuring this device (matmuls, memory, disk; a few seconds, cached afterwards)")
        profile = cached_or_measured(cache_dir, backend=backend, threads=threads, name=name)
    if name:
        profile = replace(profile, name=name[:128])
    if not profile.runtime_bytes:  # count this process, backend loaded, as its window plan will
        if backend == "torch":
            import torch  # noqa: F401
        profile = replace(profile, runtime_bytes=runtime_overhead_bytes())
    return offered_profile(profile, memory_budget).to_dict()
