"""The join token never sits on a command line: local workers get it through their environment, and a
remote device can pass it by TPI_TOKEN or --token-file. Real processes on loopback.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_reliability_support import TPI, Proc, device_profile, free_port_pair, serve, tpi_env

from tpi.transport import security

pytestmark = pytest.mark.slow


def command_lines() -> dict[int, bytes]:
    """pid -> the raw command line of every process on this machine (what `ps` shows any user)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # exited meanwhile
    return out


def parent(pid: int) -> int:
    """The parent pid of a process (0 if it exited meanwhile)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def test_no_command_line_holds_the_token_while_a_group_with_local_workers_runs(tiny_llama_q4_0, tmp_path):
    port = free_port_pair()
    token = security.master_token(tmp_path / "master-config")
    (tmp_path / "token.txt").write_text(token + "\n")
    master = serve(tiny_llama_q4_0, tmp_path, "master", "--devices", "4", "--local-workers", "1",
                   "--port", str(port), "--keep-all")
    workers = []
    try:
        master.wait_for(r"tpi join 127\.0\.0\.1", 120)
        common = ["--threads", "1", "--profile-file", str(_profile(tmp_path))]
        workers.append(Proc(["join", f"127.0.0.1:{port}", "--name", "from-file", "--token-file",
                             str(tmp_path / "token.txt"), "--cache-dir", str(tmp_path / "c1"),
                             "--key-dir", str(tmp_path / "k1"), *common], tmp_path / "from-file.log"))
        workers.append(Proc(["join", f"127.0.0.1:{port}", "--name", "from-env", "--cache-dir", str(tmp_path / "c2"),
                             "--key-dir", str(tmp_path / "k2"), *common], tmp_path / "from-env.log",
                            env={"TPI_TOKEN": token}))
        master.wait_for(r"group of 4 ready", 240)
        log = master.text()
        assert "local-1" in log and "from-file" in log and "from-env" in log
        lines = command_lines()
        holding = {pid: cmd.replace(b"\0", b" ")[:200] for pid, cmd in lines.items() if token.encode() in cmd}
        assert not holding, f"the token is on these command lines: {holding}"
        local = [pid for pid, cmd in lines.items() if b"local-1" in cmd and parent(pid) == master.popen.pid]
        assert len(local) == 1  # the local worker runs, and got the token from its environment
        assert f"TPI_TOKEN={token}".encode() in Path(f"/proc/{local[0]}/environ").read_bytes()
        assert oct(os.stat(f"/proc/{local[0]}/environ").st_mode & 0o777) == "0o400"  # its owner's only
        assert "read -rs TPI_TOKEN && export TPI_TOKEN (paste the token), then: tpi join " in log
    finally:
        for p in [master, *workers]:  # a stopped master stops its local worker too
            p.stop()


def test_a_missing_or_doubled_token_is_one_error_line(tmp_path):
    def join(*args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(TPI + ["join", "127.0.0.1:9", *args, "--cache-dir", str(tmp_path)], capture_output=True,
                              text=True, timeout=120, env=tpi_env() | (env or {}), input=stdin)

    (tmp_path / "empty").write_text("\n")
    cases = [(join(), "no join token"), (join("--token-file", str(tmp_path / "empty")), "is empty"),
             (join("--token-file", str(tmp_path / "missing")), "cannot read the token file"),
             (join("--token-file", str(tmp_path / "empty"), env={"TPI_TOKEN": "x"}), "give the token once"),
             (join("--token-file", "-", stdin="not-a-token\n"), "join token decodes to")]  # read from the pipe
    for proc, needle in cases:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1 and needle in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr


def _profile(tmp: Path) -> Path:
    path = tmp / "profile.json"
    path.write_text(json.dumps(device_profile("remote")))
    return path
