"""Measure this process's memory: the runtime overhead a window plan must budget for."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

def _status_kib(field: str, pid: int | None = None) -> int | None:
    """A `VmXXX:  1234 kB` field of /proc/PID/status (this process's by default) in KiB, or None
    off Linux or for a process that is gone."""
    try:
        text = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size now (VmRSS) of this process or `pid`; this process falls back to its peak where
    /proc is missing, another reads 0 when it is gone."""
    kib = _status_kib("VmRSS", pid)
    return kib * 1024 if kib is not None else (_maxrss_bytes() if pid is None else 0)


def peak_rss_bytes(pid: int | None = None) -> int:
    """High-water mark of the resident set (VmHWM) of this process or `pid` (0 when it is gone): the
    one peak-RSS reader of the CLI's --stats, the benchmarks and the tests."""
    kib = _status_kib("VmHWM", pid)
    return kib * 1024 if kib is not None else (_maxrss_bytes() if pid is None else 0)


def runtime_overhead_bytes(margin: float = 0.1, floor: int = 16 << 20) -> int:
    """Baseline RSS of the runtime with a safety margin; call it after the backend is imported.

    What the interpreter, numpy/torch, sockets and thread stacks hold before any weight is
    loaded. The margin (fraction, at least `floor` bytes) covers allocator slack and the
    transient buffers of a step that the activation estimate does not name.
    """
    assert margin >= 0 and floor >= 0
    base = rss_bytes()
    return base + max(int(base * margin), floor)
