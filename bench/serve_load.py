"""Load on `tpi serve --parallel N` (continuous batching, issue 17): aggregate tokens/s, TTFT and
inter-token latency at several concurrencies, on one device and on a 2-device loopback group.

Each setup is one real `tpi serve` process (plus a `tpi join` process for the group, started by
--local-workers) driven by the openai client: concurrent streamed chat requests of --tokens tokens
each (ignore_eos, greedy). Rounds interleave the concurrencies so that machine noise hits all alike;
the table reports medians, and each concurrency's aggregate tokens/s as a ratio to concurrency 1 of
the same server in the same run (the anchor: one request alone). The profile columns come from the
server's own counters (GET /v1/tpi/status): rows per step and milliseconds per step.

    python bench/serve_load.py [--model PATH] [--tokens 128] [--concurrency 1,2,4,8] [--rounds 3]
    python bench/serve_load.py --setups one,group --threads 2 --group-threads 1
    python bench/serve_load.py --setups group --speculate off,lookup --prompt edit --concurrency 1,4

--speculate runs one server per mode, all up at once, rounds interleaved across modes; "vs off" is
each row's aggregate tokens/s against the first mode's at the same concurrency, in the same run.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, median, print_table  # noqa: E402
from spec_prompts import EDIT_REQUEST, STORY_REQUEST  # noqa: E402

QUESTIONS = ["Tell me a long story about a lighthouse keeper.", "Explain how bread rises, step by step.",
             "Describe the water cycle in detail.", "Write a letter to a friend about a trip to the mountains.",
             "List the planets and say something about each.", "How does a bicycle stay upright?",
             "Describe a busy market in the morning.", "Explain what a compiler does."]
START_TIMEOUT_S = 300


class Server:
    """A `tpi serve` subprocess on loopback; its API URL once /health says ok."""

    def __init__(self, args: list[str], tmp: Path, label: str):
        self.log = tmp / f"{label}.log"
        env = os.environ | {"PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TPI_API_KEY": ""}
        cmd = [sys.executable, "-m", "tpi", "serve", "--api-port", "0", "--port", "0", "--insecure", "--no-announce",
               "--queue-size", "16", "--cache-dir", str(tmp / "cache"), "--config-dir", str(tmp / "cfg"), *args]
        self.command = "tpi serve " + " ".join(cmd[4:])
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        self.url, deadline = None, time.monotonic() + START_TIMEOUT_S
        while True:
            if self.url is None:
                m = re.search(r"API on (http://[\d.]+:\d+)/v1", self.log.read_text())
                self.url = m.group(1) if m else None
            if self.url and httpx.get(self.url + "/health", timeout=5).json()["status"] == "ok":
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"tpi serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def batch_counters(self) -> dict:
        return httpx.get(self.url + "/v1/tpi/status", timeout=10).json()["service"].get("batch", {})

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_request(client, question: str, tokens: int) -> dict:
    """A streamed greedy chat request: (arrival times of its pieces, first token, end)."""
    t0 = time.perf_counter()
    stamps = []
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                            max_tokens=tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return {"t0": t0, "stamps": stamps, "end": time.perf_counter(), "tokens": usage or len(stamps)}


def run_round(server: Server, concurrency: int, tokens: int, questions: list[str]) -> dict:
    """concurrency requests at once; aggregate tokens/s over the wall time, and their latencies."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
    before = server.batch_counters()
    results: list[dict] = [{}] * concurrency
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, one_request(client, questions[i % len(questions)], tokens))) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = server.batch_counters()
    steps = after.get("steps", 0) - before.get("steps", 0)
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft": [r["stamps"][0] - r["t0"] for r in results if r["stamps"]], "itl": gaps,
            "rows_per_step": (after.get("rows", 0) - before.get("rows", 0)) / steps if steps else float("nan"),
            "ms_per_step": 1e3 * (after.get("step_seconds", 0) - before.get("step_seconds", 0)) / steps if steps else float("nan")}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def bench_setup(label: str, args: list[str], modes: list[str], concurrencies: list[int], rounds: int, tokens: int,
                questions: list[str], tmp: Path) -> list:
    """One server per --speculate mode, all up at once; rounds interleave concurrencies and modes."""
    servers = {}
    try:
        for mode in modes:
            servers[mode] = Server(args + ["--speculate", mode], tmp, f"{label}-{mode}".replace(" ", "_"))
            run_round(servers[mode], 1, 8, questions)  # warm-up: graphs built, caches touched
        per = {(m, c): [] for m in modes for c in concurrencies}
        for _ in range(rounds):
            for c in concurrencies:
                for m in modes:
                    per[m, c].append(run_round(servers[m], c, tokens, questions))
    finally:
        for server in servers.values():
            server.close()
    rows = []
    for m in modes:
        anchor = median([r["tok_s"] for r in per[m, concurrencies[0]]])
        for c in concurrencies:
            rs = per[m, c]
            tok_s = median([r["tok_s"] for r in rs])
            base = median([r["tok_s"] for r in per[modes[0], c]])
            ttft = [x for r in rs for x in r["ttft"]]
            itl = [x for r in rs for x in r["itl"]]
            rows.append([label, m, c, f"{tok_s:.1f}", f"{tok_s / anchor:.2f}x", f"{tok_s / base:.2f}x",
                         f"{1e3 * percentile(ttft, 50):.0f}", f"{1e3 * percentile(ttft, 95):.0f}",
                         f"{1e3 * percentile(itl, 50):.1f}", f"{1e3 * percentile(itl, 95):.1f}",
                         f"{median([r['rows_per_step'] for r in rs]):.2f}",
                         f"{median([r['ms_per_step'] for r in rs]):.1f}"])
        print(f"  {label} ({m}): {servers[m].command}", file=sys.stderr)
    return rows


def step_profile(model: str | None, threads: int, context: int, counts: list[int], reps: int) -> list:
    """In process, one device: ms of a decode step of k sequences (one row each, k KV slots) against a
    k-token prompt chunk of one sequence (the same matmul rows, one attention run), and against one row;
    then llama.cpp's own k-sequence step on the same model and threads (bench/llama_rows.py), the
    ceiling: no engine on these kernels serves k sequences more than k / its cost ratio times faster."""
    from llama_rows import default_model, step_costs  # the bench's llama.cpp anchor

    from tpi.master import EngineOptions, build_local_engine
    from tpi.model.rows import Rows

    engine = build_local_engine(EngineOptions(model=model, context=context, threads=threads, backend="ggml",
                                              slots=max(counts)))
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}])
    for slot in range(max(counts)):
        engine.step(prompt, Rows.of_runs([slot], [0], [len(prompt)]))
    at = len(prompt)

    def timed(ids, rows) -> float:
        t0 = time.perf_counter()
        engine.step(ids, rows)
        return time.perf_counter() - t0

    times = {("rows", k): [] for k in counts} | {("chunk", k): [] for k in counts}
    for _ in range(reps):  # interleaved rounds: noise hits every shape alike
        for k in counts:
            for kind, rows in (("rows", Rows.of_runs(list(range(k)), [at] * k, [1] * k)),
                               ("chunk", Rows.of_runs([0], [at], [k]))):
                timed([5] * k, rows)  # a new shape builds its graph: not timed
                times[kind, k] += [timed([5] * k, rows) for _ in range(3)]
    ref = step_costs(model or default_model(), threads, counts, reps, kinds=("seqs",))
    one, ref_one = median(times["rows", counts[0]]), ref["seqs", counts[0]]
    out = []
    for k in counts:
        ours, theirs = median(times["rows", k]), ref["seqs", k]
        out.append([k, f"{1e3 * ours:.1f}", f"{ours / one:.2f}x", f"{1e3 * median(times['chunk', k]):.1f}",
                    f"{k * one / ours:.2f}x", f"{1e3 * theirs:.1f}", f"{theirs / ref_one:.2f}x",
                    f"{k * ref_one / theirs:.2f}x", f"{theirs / ours:.2f}x"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--setups", default="one,group")
    ap.add_argument("--threads", type=int, default=2, help="threads of the one-device server")
    ap.add_argument("--group-threads", type=int, default=1, help="threads of each process of the 2-device group")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--speculate", default="off",
                    help="comma-separated --speculate modes, one server each (the first is the 'vs' anchor)")
    ap.add_argument("--prompt", choices=("chat", "edit", "story"), default="chat",
                    help="chat: mixed questions; edit, story: bench/spec_prompts.py's prompt-grounded edit, open story")
    ap.add_argument("--step-profile", action="store_true",
                    help="also time one device's step by rows in process (what bounds the one-device ratio)")
    a = ap.parse_args()
    concurrencies = [int(c) for c in a.concurrency.split(",")]
    modes = a.speculate.split(",")
    questions = {"chat": QUESTIONS, "edit": [EDIT_REQUEST], "story": [STORY_REQUEST]}[a.prompt]
    parallel = str(max(concurrencies))
    common = ([a.model] if a.model else []) + ["--parallel", parallel, "--context", str(a.context), "--backend", "ggml"]
    setups = {"one": ("one device", common + ["--threads", str(a.threads)]),
              "group": ("2-device loopback group", common + ["--local-workers", "1", "--keep-all", "--ratios", "1,1",
                                                             "--threads", str(a.group_threads), "--wire-dtype", "f32"])}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tpi-serve-load-") as tmp:
        for key in a.setups.split(","):
            label, args = setups[key]
            rows += bench_setup(label, args, modes, concurrencies, a.rounds, a.tokens, questions, Path(tmp))
    print_table("tpi serve --parallel: aggregate throughput and latency",
                ["setup", "--speculate", "concurrency", "aggregate tok/s", "vs 1", f"vs {modes[0]}", "TTFT p50 ms",
                 "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms", "rows/step", "ms/step"], rows,
                [f"{a.tokens}-token greedy {a.prompt} requests, medians of {a.rounds} interleaved rounds",
                 f"machine: {machine_info()}", "command: python bench/serve_load.py " + " ".join(sys.argv[1:])])
    if a.step_profile:
        print_table(f"one device's step by rows ({a.threads} thread(s), in process)",
                    ["rows", "k sequences, 1 row each: ms", "vs 1 row", "one sequence, k-token chunk: ms",
                     "throughput gain possible", "llama.cpp k sequences: ms", "llama.cpp vs 1 row",
                     "llama.cpp gain (ceiling)", "tpi speed vs llama.cpp"],
                    step_profile(a.model, a.threads, a.context, [1, 2, 4, 8], a.rounds + 1),
                    ["a step of k rows costs about what a k-token chunk of one sequence costs: the matmuls,"
                     " not the batching, set the one-device ratio",
                     "llama.cpp: its own llama_decode of a k-sequence batch (bench/llama_rows.py), same model,"
                     " threads and run; its gain k * t(1) / t(k) is what these kernels allow one device"])


if __name__ == "__main__":
    main()
