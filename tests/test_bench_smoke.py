"""Every benchmark script runs in --smoke mode and prints a well-formed markdown table with a ratio.

Benchmarks are not timed tests: nothing here checks a speed, only that the scripts work and
that their output is what bench/run_all.py puts into docs/benchmarks.md.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

RATIO_CELL = re.compile(r"^(\d+(\.\d+)?x|[+-]?\d+(\.\d+)?%)$")  # bench/common.ratio "1.23x", or an error "+7%"


def parse_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables in text: (header cells, data rows); asserts the separator row is there."""
    lines = text.splitlines()
    tables = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            sep = lines[i + 1].strip("|").split("|")
            assert len(sep) == len(header), f"separator has {len(sep)} cells, header {len(header)}"
            assert all(re.fullmatch(r":?-{3,}:?", s.strip()) for s in sep), lines[i + 1]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def assert_well_formed(text: str) -> list[tuple[list[str], list[list[str]]]]:
    tables = parse_tables(text)
    assert tables, f"no markdown table in:\n{text[-2000:]}"
    for header, rows in tables:
        assert rows, f"table {header} has no data row"
        for row in rows:
            assert len(row) == len(header), f"row {row} does not match header {header}"
        assert any(RATIO_CELL.match(c) for row in rows for c in row), f"table {header} has no ratio column"
    return tables


def run_bench(script: str, *args: str, timeout: float = 300) -> str:
    """The script's stdout; on a timeout its whole process group (spawned ranks, proxies) is killed."""
    proc = subprocess.Popen([sys.executable, str(BENCH / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"{script} failed:\n{err[-3000:]}"
    return out


# ---- the table parser itself: it must be able to fail ------------------------------------------------

def test_parser_accepts_a_table_with_a_ratio_and_rejects_broken_ones():
    good = "### t\n\n| a | ratio |\n|---|---:|\n| x | 1.50x |\n"
    (header, rows), = assert_well_formed(good)
    assert header == ["a", "ratio"] and rows == [["x", "1.50x"]]
    with pytest.raises(AssertionError, match="no data row"):
        assert_well_formed("| a | ratio |\n|---|---:|\n")
    with pytest.raises(AssertionError, match="no ratio column"):
        assert_well_formed("| a | b |\n|---|---:|\n| x | 1.5 |\n")
    assert_well_formed("| a | error |\n|---|---:|\n| x | -6% |\n")
    with pytest.raises(AssertionError, match="no markdown table"):
        assert_well_formed("| a | b |\n| x | 1.5 |\n")


# ---- run_all: sections, missing and failing benchmarks ------------------------------------------------

def test_run_all_replaces_only_its_sections_and_keeps_hand_written_text():
    from run_all import marked, merge

    doc = "# Benchmarks\n\nProfile notes by hand.\n\n" + marked("tp", "old tp") + "\n\nMore notes.\n"
    out = merge(doc, {"machine": "machine line", "tp": "new tp", "allreduce": "ar table"})
    assert "old tp" not in out and marked("tp", "new tp") in out
    assert "Profile notes by hand." in out and "More notes." in out
    assert out.index("machine line") < out.index("Profile notes") < out.index("ar table")
    assert merge(out, {"tp": "new tp"}) == out  # idempotent


def test_run_all_reports_missing_and_failing_benchmarks_instead_of_aborting(tmp_path):
    from run_all import Benchmark, run_one

    missing = run_one(Benchmark("ghost", str(tmp_path / "ghost.py"), ("--delays-ms", "", "--tokens", "16"),
                                about="absent"), False, sys.executable)
    assert "**Not run:" in missing and "ghost.py is missing" in missing
    command = re.search(r"Command: `(.*)`", missing).group(1)  # a reader copies it: an empty value stays quoted
    assert shlex.split(command)[2:] == ["--delays-ms", "", "--tokens", "16"]
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nprint('partial output')\nsys.exit('it broke here')\n")
    failed = run_one(Benchmark("broken", str(broken), about="fails"), False, sys.executable)
    assert "**broken failed (exit 1).**" in failed and "it broke here" in failed and "partial output" in failed
    fine = tmp_path / "fine.py"
    fine.write_text("print('| a | r |'); print('|---|---:|'); print('| x | 2.00x |')\n")
    section = run_one(Benchmark("fine", str(fine), about="works"), False, sys.executable)
    assert "exit 0" in section and "Command: `python bench/" in section
    assert_well_formed(section)


# ---- each benchmark's --smoke run ---------------------------------------------------------------------

@pytest.mark.slow
def test_single_device_smoke_on_a_synthetic_qwen2(tmp_path):
    out = run_bench("single_device.py", "--smoke", "--synthetic", "tiny-qwen2", "--cache-dir", str(tmp_path))
    (header, rows), = assert_well_formed(out)
    assert [r[0] for r in rows] == ["llama.cpp", "llama.cpp, flash attention", "tpi ggml", "tpi torch"]
    assert "decode tok/s" in header
    assert (tmp_path / "tiny-qwen2-q4_0.gguf").exists()


@pytest.mark.slow
def test_allreduce_smoke_has_star_ring_gloo_and_the_anchor():
    # One retry: now and then the pyzmq echo anchor's client waits out its 120 s receive timeout
    # for a reply (seen alone too, in about 1 run of 4 while other jobs ran); a second failure is a
    # real one. A run takes ~12 s, so 60 s cuts a stuck one short instead of waiting the 120 s.
    try:
        out = run_bench("allreduce.py", "--smoke", timeout=60)
    except (AssertionError, subprocess.TimeoutExpired):
        out = run_bench("allreduce.py", "--smoke", timeout=60)
    (header, rows), = assert_well_formed(out)
    for col in ("pyzmq echo", "star median", "ring median", "gloo median", "star/echo (paired)"):
        assert col in header
    delays = {r[header.index("one-way delay ms")] for r in rows}
    assert delays == {"0", "1"}
    assert {r[header.index("wire")] for r in rows} == {"f32", "bf16", "int8"}
    for r in rows:  # latencies are positive numbers; gloo only without delay, ring and gloo without int8
        assert float(r[header.index("star median")]) > 0 and float(r[header.index("pyzmq echo")]) > 0
        assert r[header.index("star/echo (paired)")].endswith("x")
        q8 = r[header.index("wire")] == "int8"
        assert (r[header.index("gloo median")] == "-") == (r[header.index("one-way delay ms")] != "0" or q8)
        assert (r[header.index("ring median")] == "-") == q8


@pytest.mark.slow
def test_paper_smoke_compares_tpi_with_accelerate_offload(tmp_path):
    pytest.importorskip("accelerate")
    out = run_bench("paper.py", "--smoke", "--cache-dir", str(tmp_path))
    (header, rows), = assert_well_formed(out)
    systems = [r[0] for r in rows]
    assert systems[0].startswith("transformers") and len(systems) == 3
    assert all(r[3] != "failed" for r in rows), rows
    assert "on disk" in rows[0][header.index("weights")]


@pytest.mark.slow
@pytest.mark.parametrize("script", [
    "tp.py", "tp_paired.py", "memory.py", "costmodel.py", "backends.py", "star_floor.py", "moe.py",
])
def test_other_benchmarks_smoke(script):
    if not (BENCH / script).exists():
        pytest.skip(f"bench/{script} is not written yet")
    tables = assert_well_formed(run_bench(script, "--smoke", timeout=600))
    # costmodel.py and memory.py report a configuration that failed in its row and carry on
    failed = [row for _, rows in tables for row in rows if any(c.startswith("failed") for c in row)]
    assert failed == [], failed


@pytest.mark.slow
def test_tp_speculation_smoke():
    """bench/tp.py --speculation: one device and the proxied pair, edit and story, off vs auto."""
    tables = assert_well_formed(run_bench("tp.py", "--speculation", "--smoke", "--backend", "ggml", timeout=600))
    (_, rows), (ceiling_header, ceiling) = tables
    assert len(rows) == 4 and all(row[-1] == "yes" for row in rows), rows  # the same tokens with and without
    # llama.cpp's own (k+1)-token steps bound one device's gain: k = 1, 2, 4, 8 drafts
    assert [row[0] for row in ceiling] == ["1", "2", "4", "8"], ceiling
    full = ceiling_header.index("gain at full acceptance")
    assert all(float(row[full].rstrip("x")) > 0 for row in ceiling), ceiling
