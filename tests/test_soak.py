"""Soak: one `tpi serve` of the embedded SmolLM2 (with one local worker) answers hundreds of requests and
bursts, and its worker is killed (-9) once, at a random request in the middle.

80 sequential requests (completions, chat, streamed) and bursts of concurrent ones against
a queue of 4. Every request must be served (200, well-formed, the same greedy text as
its first answer) or refused with 429 and a Retry-After; an exception, a timeout or any other
status fails the test: the kill costs a pause (the master restarts the worker, which rejoins from its
cache, and the request in flight resumes), not a request. The client's counts must equal the server's
own counters. The master's
RSS (VmRSS) is sampled after warm-up and at the end; its growth must stay under RSS_BOUND, which
allows ~0.3 MiB per request after warm-up (measured: under 1 MiB in all).
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from test_reliability_support import api_url, serve, wait_healthy

from tpi.scheduler.overhead import rss_bytes

pytestmark = pytest.mark.slow

SEQUENTIAL = 80
BURSTS = 3
BURST_SIZE = 12
QUEUE_SIZE = 4
MAX_TOKENS = 4
WARM_UP = 10
RSS_BOUND = 24 << 20  # over the 70 sequential and 36 burst requests after warm-up
PROMPTS = ("The capital of France is", "Water boils at", "Tell me a colour.", "One, two, three,")


def local_worker_pid(master_pid: int) -> int:
    """The pid of the local worker process the master started (its child)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == master_pid and b"local-1" in cmd:
                return int(entry.name)
    raise AssertionError("the master's local worker is not running")


def request_for(i: int) -> tuple[str, dict, str]:
    """(kind, body, prompt) of the i-th request: completions, chat or streamed completions in turn."""
    prompt = PROMPTS[i % len(PROMPTS)]
    common = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    kind = ("completion", "chat", "stream")[i % 3]
    if kind == "chat":
        return kind, {"messages": [{"role": "user", "content": prompt}], **common}, prompt
    return kind, {"prompt": prompt, "stream": kind == "stream", **common}, prompt


def send(http: httpx.Client, url: str, i: int) -> tuple[str, str, str]:
    """Send request i; returns ("served", key, text) or ("refused", "", retry-after).

    Anything but a well-formed 200 or a 429 with Retry-After raises AssertionError.
    """
    kind, body, prompt = request_for(i)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    with http.stream("POST", url + path, json=body) as reply:
        if reply.status_code == 429:
            reply.read()
            retry = reply.headers.get("Retry-After", "")
            assert retry.isdigit() and int(retry) >= 1, f"429 without a usable Retry-After: {reply.headers}"
            assert reply.json()["error"]["code"] == "queue_full", reply.text
            return "refused", "", retry
        assert reply.status_code == 200, f"request {i} ({kind}): {reply.status_code} {reply.read()!r}"
        if kind == "stream":
            lines = [ln for ln in reply.iter_lines() if ln]
            assert lines[-1] == "data: [DONE]", lines[-3:]
            chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
            text = "".join(c["choices"][0]["text"] for c in chunks)
        else:
            out = json.loads(reply.read())
            assert out["usage"]["completion_tokens"] == MAX_TOKENS, out
            choice = out["choices"][0]
            assert choice["finish_reason"] == "length", out
            text = choice["message"]["content"] if kind == "chat" else choice["text"]
    assert isinstance(text, str) and text, f"request {i} ({kind}) gave no text"
    return "served", f"{'chat' if kind == 'chat' else 'text'}:{prompt}", text


def test_soak_every_request_is_served_or_refused_and_rss_stays_bounded(smollm2, tmp_path):
    master = serve(smollm2, tmp_path, "soak-master", "--queue-size", str(QUEUE_SIZE), "--local-workers", "1")
    kill_at = random.Random(os.getpid()).randrange(WARM_UP + 10, SEQUENTIAL - 10)  # a request in the middle
    counts: Counter = Counter()
    answers: dict[str, str] = {}
    lost: list[str] = []
    lock = threading.Lock()

    def record(i: int, http: httpx.Client, url: str) -> None:
        try:
            outcome, key, text = send(http, url, i)
        except (AssertionError, httpx.HTTPError, ValueError) as e:  # any of these is a lost request
            lost.append(f"request {i}: {type(e).__name__}: {e}")
            return
        with lock:
            counts[outcome] += 1
            # Greedy: the same request must give the same text every time (streamed or not).
            if outcome == "served" and answers.setdefault(key, text) != text:
                lost.append(f"request {i} ({key}) answered {text!r}, before {answers[key]!r}")

    try:
        url = api_url(master)
        wait_healthy(url, master)
        started = time.monotonic()
        with httpx.Client(timeout=120) as http:
            for i in range(WARM_UP):
                record(i, http, url)
            warm_rss = rss_bytes(master.popen.pid)
            peak_rss = warm_rss
            for i in range(WARM_UP, SEQUENTIAL):
                if i == kill_at:  # while request i runs (its first tokens are computing)
                    threading.Timer(0.05, os.kill, (local_worker_pid(master.popen.pid), signal.SIGKILL)).start()
                record(i, http, url)
                if i % 25 == 0:
                    peak_rss = max(peak_rss, rss_bytes(master.popen.pid))
            sequential = dict(counts)
            for burst in range(BURSTS):
                go = threading.Barrier(BURST_SIZE)
                base = SEQUENTIAL + burst * BURST_SIZE

                def fire(i: int) -> None:
                    go.wait()
                    record(i, http, url)

                threads = [threading.Thread(target=fire, args=(base + k,)) for k in range(BURST_SIZE)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=300)
                assert not any(t.is_alive() for t in threads), "a burst request never returned"
                peak_rss = max(peak_rss, rss_bytes(master.popen.pid))
            final_rss = rss_bytes(master.popen.pid)
            server = http.get(url + "/v1/tpi/status").json()["service"]
        elapsed = time.monotonic() - started
        health = httpx.get(url + "/health", timeout=10).json()
        assert master.alive(), master.text()[-4000:]
    finally:
        master.stop()

    sent = SEQUENTIAL + BURSTS * BURST_SIZE
    growth = final_rss - warm_rss
    print(f"\nsoak: worker killed at request {kill_at}; pauses {server['pauses']} ({server['last_pause'][:60]}); "
          f"{sent} requests in {elapsed:.0f}s: {counts['served']} served, {counts['refused']} refused "
          f"with 429 (sequential: {sequential}); master RSS after warm-up {warm_rss / 2**20:.1f} MiB, "
          f"final {final_rss / 2**20:.1f} MiB, peak {peak_rss / 2**20:.1f} MiB, growth {growth / 2**20:+.1f} MiB "
          f"(bound {RSS_BOUND >> 20} MiB)")
    assert lost == [], "\n".join(lost[:10])
    assert counts["served"] + counts["refused"] == sent
    assert sequential == {"served": SEQUENTIAL}  # one at a time never fills the queue
    assert counts["refused"] > 0  # 12 at once against 1 running + 4 waiting: some must be refused
    # The server counts the same: nothing failed or vanished on its side either.
    assert (server["completed"], server["rejected"], server["failed"]) == (counts["served"], counts["refused"], 0)
    assert growth < RSS_BOUND
    events = [e["event"] for e in health["group"]["events"]]
    assert {"lost", "restarted", "rejoined"} <= set(events) and health["status"] == "ok", health
