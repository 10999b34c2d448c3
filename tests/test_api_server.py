"""A real `tpi serve` subprocess on loopback with the embedded SmolLM2, driven by the openai client."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

KEY = "sk-tpi-test"
TPI = [sys.executable, "-m", "tpi"]
PROMPT = "Name three primary colors."
N_TOKENS = 24
START_TIMEOUT_S = 240


def tpi_env() -> dict:
    return os.environ | {"PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TPI_API_KEY": "", "TPI_URL": ""}


@pytest.fixture(scope="module")
def run_reference():
    """What `tpi run` prints greedily for PROMPT, started early so it overlaps the server's start."""
    proc = subprocess.Popen(TPI + ["run", "--temperature", "0", "-p", PROMPT, "--max-tokens", str(N_TOKENS)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=tpi_env())
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def server(run_reference, tmp_path_factory):
    log = tmp_path_factory.mktemp("api") / "server.log"
    with open(log, "w") as err:
        # --parallel 1: these tests are about one request at a time and its queue (batching: test_batching.py)
        proc = subprocess.Popen(TPI + ["serve", "--api-port", "0", "--parallel", "1", "--queue-size", "1", "--api-key", KEY,
                                       "--cache-dir", str(log.parent / "cache"), "--config-dir", str(log.parent / "cfg")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=tpi_env())
    url, ready, deadline = None, False, time.monotonic() + START_TIMEOUT_S
    while not ready:  # the API answers at once; /health says "ok" once the group serves
        m = url or re.search(r"API on (http://[\d.]+:\d+)/v1", log.read_text())
        if m and url is None:
            url = m.group(1)
        if url is not None:
            ready = httpx.get(url + "/health", timeout=5).json()["status"] == "ok"
        if ready:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"tpi serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("tpi serve did not stop on SIGTERM")


@pytest.fixture(scope="module")
def expected(run_reference, server) -> str:
    out = run_reference.communicate(timeout=START_TIMEOUT_S)[0]
    assert run_reference.returncode == 0
    return out


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def status(server) -> dict:
    return httpx.get(server + "/v1/tpi/status", headers={"Authorization": f"Bearer {KEY}"}).json()["service"]


def test_chat_with_the_openai_client_matches_tpi_run(client, model_id, expected):
    messages = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=N_TOKENS)
    assert full.choices[0].message.content + "\n" == expected
    assert full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=N_TOKENS,
                                            stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) + "\n" == expected


def test_same_seed_gives_the_same_sampled_text(client, model_id):
    def ask(prompt: str) -> str:
        return client.completions.create(model=model_id, prompt=prompt, temperature=0.9, seed=1234,
                                         max_tokens=12).choices[0].text

    # Same cache state before both asks (another prompt in between): the engine's prefix reuse
    # recomputes a fully cached prompt's last token alone, which shifts logits slightly.
    first = ask("Once upon a time")
    other = ask("Hello there")
    assert ask("Once upon a time") == first != other


def test_two_concurrent_requests_are_served_in_order(client, model_id, server):
    done: list[str] = []
    long = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Tell a story."}],
                                          max_tokens=40, stream=True, extra_body={"ignore_eos": True})
    first = next(c for c in long if c.choices and c.choices[0].delta.content)  # it is running now

    def short() -> None:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        done.append("short")

    t = threading.Thread(target=short)
    t.start()
    rest = "".join(c.choices[0].delta.content or "" for c in long if c.choices)
    done.append("long")
    t.join(120)
    assert done == ["long", "short"]
    assert first.choices[0].delta.content and rest


def test_full_queue_is_429_and_a_disconnect_frees_the_group(client, model_id, server):
    before = status(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    # A runs for the whole context unless cancelled: long enough that only its cancellation lets B finish.
    body = {"model": model_id, "messages": [{"role": "user", "content": "Count."}], "stream": True,
            "ignore_eos": True, "temperature": 0}
    b_result: dict = {}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server + "/v1/chat/completions", json=body, headers=headers) as a:
            lines = a.iter_lines()
            assert next(line for line in lines if '"content": "' in line and '"content": ""' not in line)

            def b() -> None:
                b_result["r"] = client.chat.completions.create(
                    model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)

            tb = threading.Thread(target=b)
            tb.start()
            deadline = time.monotonic() + 60
            while status(server)["queued"] < 1:
                assert time.monotonic() < deadline, "B never entered the queue"
                time.sleep(0.05)
            c = httpx.post(server + "/v1/chat/completions", headers=headers,
                           json={"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            assert c.status_code == 429
            assert int(c.headers["Retry-After"]) >= 1 and c.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        # leaving the `with` closes A's connection mid-stream
        tb.join(120)
    assert not tb.is_alive() and b_result["r"].choices[0].message.content
    after = status(server)
    assert after["cancelled"] == before["cancelled"] + 1 and after["rejected"] == before["rejected"] + 2
    assert not after["busy"] and after["queued"] == 0


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, model_id, server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server + "/v1/chat/completions"
    assert httpx.post(url, content=b"{not json", headers=headers).status_code == 400
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=model_id, prompt="hello " * 5000, max_tokens=4)
    wrong = httpx.post(url, headers=headers, json={"model": model_id, "messages": [{"role": "user", "content": 5}]})
    assert wrong.status_code == 422 and wrong.json()["error"]["param"].startswith("messages")
    ok = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_api_key_is_enforced_except_on_health(server):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    assert httpx.get(server + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}])


def test_piped_chat_over_url_prints_plain_text(server, expected):
    lines = f"{PROMPT}\n/stats\n"
    out = subprocess.run(TPI + ["chat", "--url", server, "--api-key", KEY, "--temperature", "0",
                                "--max-tokens", str(N_TOKENS)], input=lines, capture_output=True, text=True,
                         timeout=120, env=tpi_env())
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    assert out.stdout.startswith(expected)  # the same greedy answer as `tpi run`, then the /stats lines
    assert "completion_tokens:" in out.stdout[len(expected):]
