"""Shared benchmark helpers: machine description, medians, peak RSS, and a results table with ratios."""
from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from tpi.scheduler.overhead import peak_rss_bytes  # noqa: F401 (re-exported: the benchmarks' one reader)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_info() -> dict:
    """What the numbers were measured on; load average says how busy the machine was."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep platform's answer
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass  # no load average on this platform
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass  # torch-free device
    return info


def fmt(value, digits: int = 3) -> str:
    """Numbers with `digits` significant digits; everything else as str."""
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.{digits}g}"
    return str(value)


def ratio(value: float, anchor: float) -> str:
    """'1.23x' of value over anchor, or 'n/a'."""
    if not anchor or value != value or anchor != anchor:
        return "n/a"
    return f"{value / anchor:.2f}x"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence], notes: Sequence[str] = ()) -> None:
    """A rich table on a terminal, GitHub markdown otherwise (so output pastes into docs)."""
    cells = [[fmt(c) for c in row] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in cells:
            table.add_row(*row)
        console = Console()
        console.print(table)
        for note in notes:
            console.print(note)
        return
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    for row in cells:
        print("| " + " | ".join(row) + " |")
    for note in notes:
        print(f"\n{note}")


def print_machine(info: dict | None = None) -> None:
    info = info or machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))


TESTS = Path(__file__).resolve().parent.parent / "tests"


def run_proxy(listen_port: int, target_port: int, delay_s: float, mbit_s: float | None = None) -> None:
    """Forward 127.0.0.1:listen (control) and listen+1 (data) to the master with one-way delay
    (and that bandwidth each way, when given)."""
    import time

    sys.path.insert(0, str(TESTS))
    from netproxy import DelayProxy

    proxies = [DelayProxy(listen_port + i, "127.0.0.1", target_port + i, delay_s, mbit_s=mbit_s).start()
               for i in (0, 1)]
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        for p in proxies:
            p.stop()


def smoke_model(tmp: Path) -> str:
    """A 2-layer random llama with a 384-token byte-level vocabulary (opens in ms; SmolLM2's takes seconds)."""
    sys.path.insert(0, str(TESTS))
    from model_factory import write_tiny_gguf

    return str(write_tiny_gguf(tmp / "smoke.gguf", arch="llama", weight_type="Q4_0"))
