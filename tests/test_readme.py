"""The README's code blocks, run verbatim, so it cannot drift from what tpi does.

Commands are taken from README.md itself. Only its placeholders are filled in: MODEL.gguf is the
embedded SmolLM2 (a symlink in the working folder) and <TOKEN> the token `tpi serve` printed. The
group section runs on a private LAN of network namespaces where the master really is 192.168.1.20.
Every process gets its own HOME, so the default ~/.config/tpi and ~/.cache/tpi are the test's.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_lan import LanUnavailable, lan

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the venv running the tests: its `tpi` is the one under test
MASTER_IP, PHONE_IP = "192.168.1.20", "192.168.1.21"
# README commands that other tests run: the suite itself, and the fresh-venv worker install.
ELSEWHERE = {
    "make test": "the suite itself (CI runs it)",
    "python3 -m venv tpi-venv && . tpi-venv/bin/activate": "tests/test_fresh_worker.py",
    "pip install './tpi[worker]'": "tests/test_fresh_worker.py",
    "tpi join --token <TOKEN> --name phone --memory-budget 2GB": "tests/test_fresh_worker.py (and discovery)",
}
SINGLE = [
    'tpi run -p "Why is the sky blue?"',
    'tpi run MODEL.gguf -p "..." --temperature 0 --stats',
    'tpi run --raw -p "Once upon a time" --max-tokens 64',
    "tpi chat",
    "tpi chat --local-workers 1",
    "tpi perplexity --file examples/text.txt --tokens 512",
    "tpi convert MODEL.gguf model.tpis",
    'tpi run model.tpis -p "..."',
    "tpi plan llama-2-70b --devices examples/devices.toml",
]
GROUP = [
    "tpi serve MODEL.gguf --devices 2 --port 7610 --keep-all",
    "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
    """-d '{"model": "tpi", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}'""",
    "tpi chat --url http://127.0.0.1:8000",
    "tpi devices --url http://127.0.0.1:8000",
]
DEMO = ["make demo"]
ADDRESS_JOIN = "tpi join 192.168.1.20:7610 --token <TOKEN>"  # the prose's form for networks without multicast


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


def readme_commands() -> list[str]:
    """Every shell command in the README's bash blocks: continuations joined, comments dropped."""
    out = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", "").splitlines():
            command = re.sub(r"\s+#.*$", "", line.strip()) if not line.lstrip().startswith("#") else ""
            if command:
                out.append(re.sub(r"\s+", " ", command))
    return out


def test_every_readme_command_is_run_by_a_test():
    known = set(ELSEWHERE) | set(SINGLE) | set(GROUP) | set(DEMO)
    unknown = [c for c in readme_commands() if c not in known]
    assert not unknown, f"README commands no test runs (add them to tests/test_readme.py): {unknown}"
    gone = known - set(readme_commands())
    assert not gone, f"commands tests/test_readme.py runs that the README no longer shows: {gone}"
    assert f"`{ADDRESS_JOIN}`" in README.read_text()
    assert len(readme_blocks("python")) == 1


def shell(command: str, cwd: Path, home: Path, *, host=None, stdin: str = "", timeout: float = 600,
          token: str = "") -> subprocess.CompletedProcess:
    """One README command in bash, as a user would type it, with this venv's tpi first on PATH."""
    env = _env(home)
    argv = ["bash", "-c", command.replace("<TOKEN>", token)]
    return subprocess.run(host.argv(*argv) if host else argv, cwd=cwd, env=env, input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def _env(home: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in os.environ.items() if not k.startswith("TPI_")}
    return keep | {"HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "NO_COLOR": "1",
                   "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def workdir(tmp_path, smollm2) -> Path:
    """A working folder as a user has it: the model as MODEL.gguf, this checkout's examples/."""
    (tmp_path / "MODEL.gguf").symlink_to(smollm2)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def ok(proc: subprocess.CompletedProcess, command: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_the_readme_single_device_commands_work_verbatim(workdir):
    home = workdir / "home"
    outputs = {c: ok(shell(c, workdir, home, stdin="Hi\n"), c) for c in SINGLE}
    for command in SINGLE:
        if command.startswith(("tpi run", "tpi chat")):
            assert outputs[command].stdout.strip(), f"`{command}` answered nothing"
    assert "decode_tok_s" in outputs[SINGLE[1]].stderr  # --stats
    assert "group of 2 ready" in outputs["tpi chat --local-workers 1"].stderr
    ppl = float(re.search(r"perplexity: ([\d.]+)", outputs[SINGLE[5]].stdout).group(1))
    assert math.isfinite(ppl) and 1 < ppl < 100  # a real model on real English
    assert (workdir / "model.tpis").stat().st_size > 50e6
    plan = outputs[SINGLE[-1]].stdout
    assert "token latency" in plan and "desktop" in plan and "…" not in plan


@pytest.mark.slow
def test_make_demo_answers_and_says_the_normal_stop_once_and_not_as_a_warning(tmp_path):
    proc = ok(subprocess.run(["bash", "-c", "make demo"], cwd=ROOT, env=_env(tmp_path / "home"), capture_output=True,
                             text=True, timeout=900), "make demo")
    assert "sky" in proc.stdout.lower() or len(proc.stdout.split()) > 10, proc.stdout
    said = proc.stdout + proc.stderr
    assert said.count("master stopped the group") <= 1, said[-3000:]
    assert "WARNING" not in said, said[-3000:]


@pytest.mark.slow
def test_the_readme_group_works_verbatim_on_a_lan(workdir):
    try:
        with lan(2, [MASTER_IP, PHONE_IP]) as (master_host, phone_host):
            _group_on_lan(workdir, master_host, phone_host)
    except LanUnavailable as e:
        pytest.skip(str(e))


def _group_on_lan(workdir: Path, master_host, phone_host) -> None:
    serve_log = workdir / "serve.log"
    with open(serve_log, "w") as log:
        serve = subprocess.Popen(master_host.argv("bash", "-c", GROUP[0]), cwd=workdir, env=_env(workdir / "master"),
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    phone = None
    try:
        text = _wait(serve_log, serve, "short form", 180)
        token = re.search(rf"tpi join {re.escape(MASTER_IP)}:7610 --token (\S+)", text).group(1)
        assert f"tpi join --token {token}" in text  # the README's "prints:" lines
        with open(workdir / "phone.log", "w") as log:
            phone = subprocess.Popen(phone_host.argv("bash", "-c", ADDRESS_JOIN.replace("<TOKEN>", token)), cwd=workdir,
                                     env=_env(workdir / "phone"), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        _wait(serve_log, serve, "group of 2 ready", 300)
        _wait_healthy(master_host, workdir)
        curl = ok(shell(GROUP[1], workdir, workdir / "master", host=master_host, timeout=300), GROUP[1])
        assert "chat.completion.chunk" in curl.stdout and curl.stdout.rstrip().endswith("data: [DONE]"), curl.stdout
        served = {m["id"] for m in _get_json(master_host, "/v1/models")["data"]}
        chunks = [json.loads(line[6:]) for line in curl.stdout.splitlines() if line.startswith("data: {")]
        assert served == {"MODEL"} and {c["model"] for c in chunks} == served  # asked for "tpi": the real id answers
        chat = ok(shell(GROUP[2], workdir, workdir / "master", host=master_host, stdin="Hi\n", timeout=300), GROUP[2])
        assert chat.stdout.strip()
        (workdir / "example.py").write_text(readme_blocks("python")[0])
        python = ok(subprocess.run(master_host.argv(sys.executable, str(workdir / "example.py")), cwd=workdir,
                                   env=_env(workdir / "master"), capture_output=True, text=True, timeout=300), "python")
        assert python.stdout.strip()
        devices = ok(shell(GROUP[3], workdir, workdir / "master", host=master_host), GROUP[3]).stdout
        assert PHONE_IP in devices and "…" not in devices
    finally:
        stop_group(serve, phone)
    assert phone.returncode == 0, (workdir / "phone.log").read_text()[-3000:]


def stop_group(serve: subprocess.Popen, *devices: subprocess.Popen | None) -> None:
    """SIGTERM to `tpi serve` (a stopped master stops its devices), then wait for all (kill after 60 s)."""
    serve.send_signal(signal.SIGTERM)
    for proc in (serve, *devices):
        if proc is not None:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait(log: Path, proc: subprocess.Popen, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := log.read_text(errors="replace")):
        assert proc.poll() is None, f"exited before {needle!r}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"{needle!r} not within {timeout}s:\n{text[-3000:]}"
        time.sleep(0.2)
    return text


def _get_json(host, path: str) -> dict:
    """GET the master's API from inside its namespace."""
    code = f"import httpx; print(httpx.get('http://127.0.0.1:8000{path}', timeout=5).text)"
    out = subprocess.run(host.argv(sys.executable, "-c", code), capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}


def _wait_healthy(host, workdir: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (body := _get_json(host, "/health")).get("status") != "ok":
        assert time.monotonic() < deadline, body
        time.sleep(0.5)

