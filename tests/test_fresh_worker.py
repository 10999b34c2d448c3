"""The phone path as the README tells it: a fresh venv without torch, `pip install './tpi[worker]'`, then
the README's exact `tpi join` command joins a live master on the LAN, and the group answers correctly.

Nothing comes from the test's own venv: a new venv (python3 -m venv), its own HOME (so its own pip
cache), and a clean copy of this checkout in a folder called `tpi`, as the README has it. The master
runs in this venv in one network namespace; the worker in another, on a bridge (tests/netns_lan.py).
Takes minutes: pip installs the worker's dependencies from the package index.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netns_lan import LanUnavailable, lan
from test_readme import ROOT, _env, _get_json, _wait, _wait_healthy, readme_blocks, stop_group

from tpi.master.sampler import SamplingParams
from tpi.transport import security

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
CLEAN_COPY_IGNORES = shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "dist", "*.egg-info",
                                            ".pytest_cache", ".hypothesis")


def worker_block() -> list[str]:
    """The README's block for every other device: make the venv, install, join."""
    block = next(b for b in readme_blocks("bash") if "pip install './tpi[worker]'" in b)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def fresh_env(home: Path) -> dict:
    """A shell environment with nothing of the test's venv: PATH without it, no VIRTUAL_ENV, own HOME."""
    home.mkdir(parents=True, exist_ok=True)
    here = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != here)
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("TPI_", "VIRTUAL_ENV", "PYTHON", "PIP_NO"))}
    return keep | {"HOME": str(home), "PATH": path, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def fresh_worker_venv(tmp_path_factory) -> Path:
    """The folder holding `tpi` (a clean copy of this checkout) and `tpi-venv`, installed by the README's lines."""
    where = tmp_path_factory.mktemp("device")
    shutil.copytree(ROOT, where / "tpi", ignore=CLEAN_COPY_IGNORES, symlinks=True)
    make_venv, install, _ = worker_block()
    assert make_venv.startswith("python3 -m venv tpi-venv") and install == "pip install './tpi[worker]'"
    proc = subprocess.run(["bash", "-c", f"set -e\n{make_venv}\n{install}"], cwd=where, env=fresh_env(where / "home"),
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return where


def in_venv(where: Path, command: str, host=None, **kw) -> subprocess.CompletedProcess:
    argv = ["bash", "-c", f". tpi-venv/bin/activate && {command}"]
    return subprocess.run(host.argv(*argv) if host else argv, cwd=where, env=fresh_env(where / "home"),
                          capture_output=True, text=True, **kw)


def test_the_worker_install_has_no_torch_and_names_the_extra_for_what_it_lacks(fresh_worker_venv, smollm2):
    where = fresh_worker_venv
    probe = "import importlib.util as u; print([m for m in ('torch', 'llama_cpp', 'fastapi', 'zeroconf') if u.find_spec(m)])"
    assert in_venv(where, f'python -c "{probe}"', timeout=60).stdout.strip() == "['zeroconf']"
    token = security.master_token(where / "some-master")  # well formed; no master needs to run
    for command, extra in (("tpi serve --devices 2", "all"), (f"tpi run {smollm2} -p hi", "all"),
                           (f"tpi join 127.0.0.1:9 --token {token} --backend torch", "all"),
                           (f"tpi join 127.0.0.1:9 --token {token} --backend ggml", "worker-fast")):
        proc = in_venv(where, command, timeout=120)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1, (command, proc.stderr[-2000:])
        # an installed copy (not a checkout) names the README's ./tpi, never PyPI's unrelated 'tpi'
        assert f"pip install './tpi[{extra}]'" in errors[0] and "Traceback" not in proc.stderr, (command, errors)


def test_the_readmes_exact_join_from_a_fresh_torch_free_venv_joins_and_the_group_answers(fresh_worker_venv, smollm2,
                                                                                        tmp_path):
    from tpi.master import GroupOptions, start_group

    *_, join = worker_block()
    assert join == "tpi join --token <TOKEN> --name phone --memory-budget 2GB"
    (tmp_path / "MODEL.gguf").symlink_to(smollm2)
    try:
        with lan(2) as (master_host, phone_host):
            answer, devices, phone_log = _serve_and_join(tmp_path, fresh_worker_venv, master_host, phone_host, join)
    except LanUnavailable as e:
        pytest.skip(str(e))
    assert "kernel backend: numpy (auto" in phone_log and "found the master of group" in phone_log
    phone = next(d for d in devices if d["name"] == "phone")
    assert phone["profile"]["backend"] == "numpy" and phone["profile"]["free_memory_bytes"] <= 2e9

    single = start_group(GroupOptions(model=str(smollm2), backend="numpy", config_dir=tmp_path / "single",
                                      cache_dir=tmp_path / "single"))
    try:
        ids = single.engine.tokenizer.encode(PROMPT, add_bos=True, special=True)
        tokens = single.engine.generate(ids, SamplingParams(temperature=0.0), 16, ignore_eos=True).tokens
        expected = single.engine.tokenizer.decode(tokens)
    finally:
        single.close()
    assert answer == expected


def _serve_and_join(tmp: Path, where: Path, master_host, phone_host, join: str) -> tuple[str, list, str]:
    """(greedy answer of the group, its devices, the phone's log) with the phone joined by `join`."""
    serve_log = tmp / "serve.log"
    with open(serve_log, "w") as log:
        # numpy on the master too: on ggml it is ~4x faster than a torch-free phone, and the planner
        # rightly leaves the phone out (measured: 28.9 ms/token alone against 123 ms with it)
        serve = subprocess.Popen(master_host.argv("bash", "-c", "tpi serve MODEL.gguf --devices 2 --port 7610 "
                                                                "--backend numpy"),
                                 cwd=tmp, env=_env(tmp / "master"), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
    phone = None
    try:
        token = re.search(r"tpi join --token (\S+)", _wait(serve_log, serve, "short form", 180)).group(1)
        phone_log = tmp / "phone.log"
        with open(phone_log, "w") as log:
            phone = subprocess.Popen(phone_host.argv("bash", "-c", f". tpi-venv/bin/activate && "
                                                     f"{join.replace('<TOKEN>', token)}"),
                                     cwd=where, env=fresh_env(where / "home"), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        _wait(serve_log, serve, "group of 2 ready", 600)
        _wait_healthy(master_host, tmp)
        code = ("import httpx, json; r = httpx.post('http://127.0.0.1:8000/v1/completions', timeout=300, json="
                f"{{'model': 'x', 'prompt': {PROMPT!r}, 'max_tokens': 16, 'temperature': 0, 'ignore_eos': True}});"
                " print(json.dumps(r.json()))")
        out = subprocess.run(master_host.argv(sys.executable, "-c", code), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)["choices"][0]["text"]
        devices = _get_json(master_host, "/health")["group"]["devices"]
    finally:
        stop_group(serve, phone)
    text = (tmp / "phone.log").read_text(errors="replace")
    assert phone.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    return answer, devices, text
