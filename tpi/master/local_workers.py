"""Local workers are the master's responsibility: `tpi join` processes it started, restarted when they die.

A restarted worker runs the same command: same name, same shard cache and keys, so it rejoins its rank
with 0 bytes re-sent (tpi.master.recovery takes it back). The join token reaches it through its
environment, never its command line (any local user can read that with `ps`).
"""
from __future__ import annotations

import logging
import subprocess
import time

log = logging.getLogger(__name__)

MIN_RESTART_GAP_S = 2.0  # a worker that dies at once again is restarted no faster than this


class LocalWorker:
    """One local worker process (Popen's poll/wait/kill/pid), which can be started again."""

    def __init__(self, name: str, cmd: list[str], env: dict):
        self.name = name
        self._cmd, self._env = cmd, env
        self.restarts = 0
        self._started = 0.0
        self.popen = self._start()

    def _start(self) -> subprocess.Popen:
        self._started = time.monotonic()
        return subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL, env=self._env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        self.popen.kill()

    def died(self) -> bool:
        """It ended by itself with a failure or a signal (0 is a deliberate exit: the master stopped it)."""
        return self.popen.poll() not in (None, 0)

    def restart_due(self) -> bool:
        return self.died() and time.monotonic() - self._started >= MIN_RESTART_GAP_S

    def restart(self) -> str:
        """Start the same command again; returns what to log."""
        code = self.popen.returncode
        self.restarts += 1
        self.popen = self._start()
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"local worker {self.name} ended ({how}); restarted it (pid {self.popen.pid}, restart {self.restarts})"
