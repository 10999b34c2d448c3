"""A process under --memory-budget stays within it, runs to the end, and says the same thing.

Each run is a fresh process, so the runtime overhead is measured the way a user's run measures it.
Budgets are found, not guessed: a run with a 1-byte budget is refused with the minimum feasible
budget in bytes (measured overhead + KV cache + transients + globals + the largest block), and the
real run gets that minimum + MARGIN: enough to run, far too little to pin the model, so most
blocks stream. A first run caches rank 0's store, so the probes measure the same process state
as the real run (cutting a GGUF leaves its pages in the resident set).

Stated overhead: peak RSS (VmHWM) <= budget + RSS_TOLERANCE, the allocator slack the plan's
measured margin is meant to cover. Where root and cgroup v1 allow it, the single-device run goes
inside a memory cgroup limited to budget + RSS_TOLERANCE and must finish without an OOM kill.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cli_run import tpi_run

pytestmark = pytest.mark.slow

MiB = 1 << 20
MARGIN = 24 * MiB  # over the minimum: absorbs run-to-run overhead noise, pins well under the model
RSS_TOLERANCE = 16 * MiB
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
MINIMUM = re.compile(r"minimum feasible budget is [\d.]+ \S+ \((\d+) bytes")


def minimum_from(text: str) -> int:
    found = MINIMUM.findall(re.sub(r"\s+", " ", text))  # rich wraps log lines
    assert found, f"no minimum feasible budget in:\n{text[-3000:]}"
    return int(found[-1])


# ---------------------------------------------------------------- cgroup v1

def own_memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory directory, if there is one we may write under."""
    if os.geteuid() != 0 or not CGROUP_V1.is_dir():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = CGROUP_V1 / path.lstrip("/")
            return d if (d / "memory.limit_in_bytes").exists() else None
    return None


class MemoryCgroup:
    """A child memory cgroup with a hard limit; commands run in it via a shell that joins first."""

    def __init__(self, parent: Path, limit: int):
        self.path = parent / f"tpi-budget-{os.getpid()}-{secrets.token_hex(3)}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        self.limit = int((self.path / "memory.limit_in_bytes").read_text())

    def wrap(self, cmd: list[str]) -> list[str]:
        # join before exec, so every byte the command allocates is charged here
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *cmd]

    def oom_kills(self) -> int:
        """OOM kills inside the group (the counter exists since Linux 4.13)."""
        fields = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return int(fields["oom_kill"])

    def max_usage(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def remove(self) -> None:
        self.path.rmdir()  # only succeeds when empty: the command has exited


# ---------------------------------------------------------------- single device CLI

def test_cli_run_under_budget_gives_same_answer_within_peak_rss(tmp_path, request):
    # The first probe writes rank 0's store; the second measures a cached run. The first runs beside
    # the unbudgeted reference (both 1 thread; neither's memory figures are used).
    with ThreadPoolExecutor(1) as pool:
        first_probe = pool.submit(tpi_run, tmp_path, "--memory-budget", "1")
        ref, _ = request.getfixturevalue("smollm2_cli_run")  # the same command without a budget
        probe, _ = first_probe.result()
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert probe.returncode == 1, probe.stderr[-2000:]
    probe, _ = tpi_run(tmp_path, "--memory-budget", "1")
    assert probe.returncode == 1, probe.stderr[-2000:]
    budget = minimum_from(probe.stderr) + MARGIN
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "cache" / "master").glob("*.tpis"))

    parent = own_memory_cgroup()
    cgroup = MemoryCgroup(parent, budget + RSS_TOLERANCE) if parent else None
    try:
        run, stats = tpi_run(tmp_path, "--memory-budget", str(budget), wrap=cgroup.wrap if cgroup else (lambda c: c))
        if cgroup:
            print(f"cgroup limit {cgroup.limit / MiB:.1f} MiB, max usage {cgroup.max_usage() / MiB:.1f} MiB, "
                  f"OOM kills {cgroup.oom_kills()}")
            assert cgroup.oom_kills() == 0
    finally:
        if cgroup:
            cgroup.remove()
    assert run.returncode == 0, run.stderr[-2000:]
    print({k: stats[k] for k in ("peak_rss_bytes", "budget_bytes", "pinned_blocks", "streamed_blocks", "window",
                                 "stall_s", "bytes_read_per_token", "overlap")})
    assert run.stdout == ref.stdout and len(run.stdout.strip()) > 0
    assert stats["streamed_blocks"] > 0 and stats["window"] >= 1
    assert stats["pinned_bytes"] + stats["window_bytes"] < 0.8 * shard_bytes  # weights held: a part of the model
    assert stats["bytes_read_per_token"] > 0 and stats["stall_s"] >= 0
    assert stats["peak_rss_bytes"] <= budget + RSS_TOLERANCE, (
        f"peak RSS {stats['peak_rss_bytes'] / MiB:.1f} MiB over budget {budget / MiB:.1f} MiB")


# ---------------------------------------------------------------- 2-device group

MASTER = """
import json, sys
from pathlib import Path
import numpy as np
from tpi.errors import TpiError
from tpi.master import GroupOptions, start_group
from tpi.master.sampler import SamplingParams
model, cache_dir, out, budget, worker_budget = sys.argv[1:]
def size(text): return int(text) or None
try:
    group = start_group(GroupOptions(model=model or None, local_workers=1, ratios=(0.5, 0.5), context=256, threads=1,
                                     memory_budget=size(budget), worker_memory_budget=size(worker_budget),
                                     insecure=True, config_dir=Path(cache_dir) / "config",
                                     cache_dir=Path(cache_dir), join_timeout_s=120))
except TpiError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
from tpi.scheduler.overhead import peak_rss_bytes as peak
try:
    e = group.engine
    ids = e.tokenizer.encode("The capital of France is Paris. The capital of Italy is", add_bos=True, special=True)
    logits = e.forward(ids, 0, all_positions=True)
    e.reset()
    gen = e.generate(ids, SamplingParams(temperature=0.0), 8, ignore_eos=True)
    np.save(out + ".npy", logits)
    plan = getattr(e.model.weights, "plan", None)
    Path(out + ".json").write_text(json.dumps({
        "tokens": gen.tokens, "master_peak": peak(), "worker_peak": peak(group.procs[0].pid),
        "master_streamed": len(plan.streamed) if plan else 0, "master_pinned": len(plan.pinned) if plan else 0}))
finally:
    group.close()
"""


def run_group(tmp: Path, model: Path, name: str, budget: int = 0, worker_budget: int = 0):
    out = tmp / name
    proc = subprocess.run([sys.executable, "-c", MASTER, str(model), str(tmp / "cache"), str(out), str(budget),
                           str(worker_budget)], capture_output=True, text=True, timeout=600)
    result = json.loads((tmp / f"{name}.json").read_text()) if proc.returncode == 0 else None
    logits = np.load(tmp / f"{name}.npy") if proc.returncode == 0 else None
    return proc, result, logits


def test_two_device_group_with_budgets_is_bit_identical_and_within_budgets(tmp_path, smollm2):
    ref, ref_result, ref_logits = run_group(tmp_path, smollm2, "reference")
    assert ref.returncode == 0, ref.stderr[-3000:]
    # Probes: the worker's minimum (the master also writes its own store here), then the master's.
    probe, _, _ = run_group(tmp_path, smollm2, "probe-worker", budget=1 << 40, worker_budget=1)
    assert probe.returncode == 1 and "cannot load its shard" in probe.stderr
    worker_budget = minimum_from(probe.stderr) + MARGIN
    probe, _, _ = run_group(tmp_path, smollm2, "probe-master", budget=1)
    assert probe.returncode == 1
    budget = minimum_from(probe.stderr) + MARGIN

    run, result, logits = run_group(tmp_path, smollm2, "budgeted", budget, worker_budget)
    assert run.returncode == 0, run.stderr[-3000:]
    log = re.sub(r"\s+", " ", run.stderr)
    worker_plan = re.search(r"(\d+)/(\d+) blocks pinned \([^)]*\), (\d+) streamed with window (\d+)", log)
    print(result, worker_plan and worker_plan.group(0))
    # The worker streams. The master's floor is its setup (the opened model and the pages mapped
    # while cutting, freed before serving), which can exceed its half of these small weights, so
    # it may pin them all; a master that streams in a group is measured by bench/memory.py
    # (Llama-2-7B layer shapes).
    assert worker_plan and int(worker_plan.group(3)) > 0
    assert result["master_streamed"] + result["master_pinned"] > 0  # rank 0 ran on the budget path
    assert result["tokens"] == ref_result["tokens"]
    assert np.array_equal(logits, ref_logits)
    assert result["master_peak"] <= budget + RSS_TOLERANCE
    assert result["worker_peak"] <= worker_budget + RSS_TOLERANCE
