"""Start and stop a real `agentspeed serve` process for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import httpx

from agentspeed.launch import free_port


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until GET url/health is 200; RuntimeError if proc exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited during startup (code {proc.returncode})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout:.0f}s")


class ServerProcess:
    def __init__(self, args: Sequence[str], startup_timeout: float = 240.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = f"/tmp/agentspeed-test-server-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "agentspeed.cli", "serve", "--port", str(self.port),
               "--kv-cache-memory", "256MiB", "--log-level", "info", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, self.proc, startup_timeout)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}:\n{self.log()}") from None

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def engine_pid(self) -> int:
        """The engine-core process: the server's child running agentspeed.engine.core_proc."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if ppid == self.proc.pid and b"agentspeed.engine.core_proc" in cmd:
                return int(pid)
        raise RuntimeError("no engine process found")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def metric(text: str, name: str) -> float:
    """The value of the first sample of `name` in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
