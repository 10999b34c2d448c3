"""Run every benchmark as a subprocess and write their tables into docs/benchmarks.md.

    python bench/run_all.py                      # everything, real sizes (tens of minutes)
    python bench/run_all.py --only allreduce,tp  # a subset; other sections of the doc are kept
    python bench/run_all.py --smoke              # each benchmark's --smoke mode; prints the doc

Each benchmark prints markdown tables when its stdout is not a terminal (bench/common.py),
so its stdout goes into the doc as it is, inside a section marked with HTML comments. A
re-run replaces only the sections it ran and keeps the rest of the doc (hand-written profile
notes included). A benchmark that is missing, fails or times out gets a line saying so.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info  # noqa: E402

DOC = HERE.parent / "docs" / "benchmarks.md"
TITLE = "# Benchmarks"


@dataclass(frozen=True)
class Benchmark:
    """One script, the arguments of its full run, and what it measures."""

    name: str
    script: str
    args: tuple[str, ...] = ()
    about: str = ""
    timeout_s: float = 3600.0


BENCHMARKS = (
    Benchmark("single_device", "single_device.py", ("--backends", "ggml,torch,numpy", "--rounds", "7"),
              "tpi (ggml, torch, numpy) vs llama-cpp-python, SmolLM2-135M Q4_1"),
    Benchmark("single_device_qwen2", "single_device.py", ("--synthetic", "qwen2-1.5b", "--qtype", "Q4_K_M",
                                                          "--rounds", "5", "--backends", "ggml,torch"),
              "tpi (ggml, torch) vs llama-cpp-python, synthetic Qwen2-1.5B-shaped Q4_K_M (llama.cpp's mix)"),
    Benchmark("families", "families.py", ("--threads", "1", "--rounds", "7"),
              "tpi ggml vs llama-cpp-python on the issue-19 families: Gemma 3 270M, random Qwen3 (0.6B widths)"),
    # 1 thread: on a shared 2-core machine a 2-thread profile mostly measures threads waiting for a
    # descheduled one; the split by category is what this table is for.
    Benchmark("profile", "profile_decode.py", ("--threads", "1"),
              "where tpi's time goes (ggml by block graph; torch.profiler), SmolLM2-135M Q4_1"),
    Benchmark("profile_qwen2", "profile_decode.py", ("--synthetic", "qwen2-1.5b", "--qtype", "Q4_K_M", "--decode", "16",
                                                     "--threads", "1"),
              "where tpi's time goes (ggml by block graph; torch.profiler), synthetic Qwen2-1.5B Q4_K_M"),
    Benchmark("tp", "tp.py", ("--insecure",), "tensor-parallel decode: 1 device vs N=2 on loopback and via DelayProxy"),
    # issue 18's 0.8B Llama-shaped Q4_0 target; the ggml backend measures it with --backend ggml
    Benchmark("tp_llama08b", "tp.py", ("--insecure", "--synthetic", "llama-0.8b", "--wires", "f32,int8",
                                       "--delays-ms", "", "--tokens", "16", "--rounds", "2"),
              "tensor-parallel decode of a random 0.8B Llama-shaped Q4_0: 1 device vs N=2 on loopback"),
    # the same target paired: every engine alive, decoding in turns; SCHED_FIFO stands in for an idle machine
    Benchmark("tp_paired_llama08b", "tp_paired.py", ("--realtime", "--blocks", "16", "--block", "8",
                                                     "--variant", "f32:TPI_STAR_ONLY=1"),
              "issue 18's 0.8B target: llama.cpp, one tpi device and N=2 loopback groups decoding in turns"),
    Benchmark("tp_speculation", "tp.py", ("--speculation", "--backend", "ggml", "--tokens", "160", "--rounds", "3"),
              "speculative decoding (prompt lookup, --speculate auto vs off): 1 device and N=2 via a 1 ms proxy"),
    Benchmark("memory", "memory.py", (), "peak RSS per device against the budget (torch)"),
    Benchmark("memory_ggml", "memory.py", ("--backend", "ggml", "--repeats", "3"),
              "peak RSS per device against the budget (ggml)"),
    Benchmark("backends", "backends.py", (), "torch vs numpy backend"),
    Benchmark("allreduce", "allreduce.py", (), "allreduce latency: star (paired with a pyzmq echo) vs ring vs gloo"),
    Benchmark("allreduce_curve", "allreduce.py", ("--curve", "--delays-ms", "0", "--worlds", "2", "--no-ring",
                                                  "--no-gloo"), "allreduce latency with CURVE on star and echo"),
    Benchmark("star_floor", "star_floor.py", (), "what bounds the star on one host: libzmq vs plain TCP prototypes"),
    # issue 19's MoE targets: synthetic Qwen3-MoE 4B (0.63B per token) Q4_K_M, written once by bench/moe_model.py
    Benchmark("moe", "moe.py", ("--rounds", "3"),
              "Qwen3-MoE decode vs llama.cpp: one device, a loopback group per expert placement, streamed experts"),
    Benchmark("costmodel", "costmodel.py", ("--insecure",), "cost model predictions vs measured runs"),
    Benchmark("paper", "paper.py", (), "the TPI-LLM paper's table: transformers+accelerate offload vs tpi"),
)


def run_one(bench: Benchmark, smoke: bool, python: str) -> str:
    """The doc section of one benchmark: heading, command, date, duration, then its stdout (or why not)."""
    script = HERE / bench.script
    args = ("--smoke",) if smoke else bench.args
    command = shlex.join(["python", f"bench/{bench.script}", *args])  # quoted: an empty value stays copyable
    head = [f"## {bench.name}", "", f"{bench.about}.", "", f"Command: `{command}`  "]
    if not script.exists():
        return "\n".join(head + ["", f"**Not run: bench/{bench.script} is missing.**"])
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t = time.perf_counter()
    print(f"[run_all] {bench.name}: {command}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([python, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=600 if smoke else bench.timeout_s, cwd=HERE.parent)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, code = f"timed out after {e.timeout:.0f}s", "timeout"
    took = time.perf_counter() - t
    head.append(f"Run: {started}, {took:.0f} s, exit {code}")
    body = out.strip()
    if code != 0 or "|---" not in body:
        tail = "\n".join(err.strip().splitlines()[-12:])
        why = "failed" if code != 0 else "printed no table"
        body = (body + "\n\n" if body else "") + f"**{bench.name} {why} (exit {code}).** Last lines of stderr:\n\n" \
            f"```\n{tail}\n```"
    return "\n".join(head + ["", body])


def marked(name: str, text: str) -> str:
    return f"<!-- bench:{name} start -->\n{text.strip()}\n<!-- bench:{name} end -->"


def merge(doc: str, sections: dict[str, str]) -> str:
    """Replace each named section of doc in place; append the ones it does not have yet."""
    if not doc.strip():
        doc = TITLE + "\n"
    for name, text in sections.items():
        pattern = re.compile(rf"<!-- bench:{re.escape(name)} start -->.*?<!-- bench:{re.escape(name)} end -->",
                             re.DOTALL)
        block = marked(name, text)
        if pattern.search(doc):
            doc = pattern.sub(lambda _: block, doc, count=1)
        elif name == "machine":  # the header goes right under the title
            lines = doc.split("\n", 1)
            doc = lines[0] + "\n\n" + block + "\n" + (lines[1] if len(lines) > 1 else "")
        else:
            doc = doc.rstrip() + "\n\n" + block + "\n"
    return doc


def machine_section(smoke: bool, argv: list[str], load_before: float | None) -> str:
    info = machine_info()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        f"Last run: {when} (`python bench/run_all.py {' '.join(argv)}`{', smoke sizes' if smoke else ''}).",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, torch {info.get('torch', '-')}, "
        f"{info['os']}. Load average (1 min) {load_before} at the start and {info.get('load_avg_1m')} at the end: "
        "the machine is shared, so every table compares against an anchor measured in the same run; "
        "read the ratios, not the absolute numbers."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="each benchmark's --smoke mode (minutes, not tens)")
    ap.add_argument("--only", help="comma list of names: " + ",".join(b.name for b in BENCHMARKS))
    ap.add_argument("--out", type=Path, help=f"doc to update (default {DOC.relative_to(HERE.parent)}; "
                                             "with --smoke the doc is printed instead)")
    args = ap.parse_args()
    chosen = list(BENCHMARKS)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {b.name for b in BENCHMARKS}
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from "
                             f"{', '.join(b.name for b in BENCHMARKS)}")
        chosen = [b for b in BENCHMARKS if b.name in names]
    load_before = machine_info().get("load_avg_1m")
    sections = {b.name: run_one(b, args.smoke, sys.executable) for b in chosen}
    sections = {"machine": machine_section(args.smoke, sys.argv[1:], load_before), **sections}
    out = args.out or (None if args.smoke else DOC)
    if out is None:
        print(merge("", sections))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(merge(out.read_text() if out.exists() else "", sections))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
