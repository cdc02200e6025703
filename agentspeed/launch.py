"""Tensor-parallel process launch. Rank 0 is the calling process; ranks 1..tp-1 are
started as fresh Python processes running the same command (SPMD), told their rank through
the environment (no pickled state crosses the process boundary)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence

RANK_ENV = "AGENTSPEED_TP_RANK"
PORT_ENV = "AGENTSPEED_TP_PORT"


def worker_rank() -> int:
    """This process's rank: 0 unless it was launched as a tensor-parallel worker."""
    return int(os.environ.get(RANK_ENV, "0"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tp_port() -> int:
    return int(os.environ[PORT_ENV]) if PORT_ENV in os.environ else free_port()


def spawn_workers(tp: int, port: int, argv: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1..tp-1 running `argv` (a python -m ... command line). Their stdout is
    discarded (only rank 0 prints results); stderr is inherited so errors stay visible."""
    procs = []
    for rank in range(1, tp):
        env = dict(os.environ, **{RANK_ENV: str(rank), PORT_ENV: str(port)})
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL))
    return procs


def reap(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """Wait for workers to exit; kill any that do not within `timeout`."""
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
