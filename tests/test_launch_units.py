"""`agentspeed launch` without processes: what each replica is told, and how cores are split."""

from __future__ import annotations

import argparse
import os

import pytest

from agentspeed.cli import add_serve_args, build_parser, serve_argv
from agentspeed.entrypoints.replicas import plan_replicas, run_launch
from agentspeed.errors import ConfigError


def _launch(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["launch", *argv])


def test_serve_options_reach_every_replica_unchanged() -> None:
    args = _launch("m.gguf", "--replicas", "3", "--policy", "round_robin", "--kv-cache-memory", "256MiB",
                   "--no-overlap", "--model-alias", "claude-*", "--model-alias", "gpt-*", "--served-model-name",
                   "a", "b", "--no-prefix-caching", "--no-adaptive-drafts", "--tp", "2", "--reasoning-parser", "none")
    argv = serve_argv(args)
    assert "--replicas" not in argv and "--policy" not in argv and "m.gguf" not in argv
    p = argparse.ArgumentParser()
    add_serve_args(p, with_address=False)
    back = p.parse_args(argv)
    for a in p._actions:
        if a.dest not in ("help", "model_path"):
            assert getattr(back, a.dest) == getattr(args, a.dest), a.dest
    assert serve_argv(_launch()) == []  # defaults are not repeated


def test_cores_are_split_between_replicas() -> None:
    cores = sorted(os.sched_getaffinity(0))
    reps = plan_replicas(_launch("--replicas", "1", "--device", "cpu"), [])
    assert reps[0].cpus == cores and reps[0].gpus is None
    if len(cores) >= 2:
        a, b = plan_replicas(_launch("--replicas", "2", "--device", "cpu", "--replica-port-base", "9000"), [])
        assert a.cpus and b.cpus and not set(a.cpus) & set(b.cpus)
        assert (a.http_port, a.grpc_port, b.http_port, b.grpc_port) == (9000, 9001, 9002, 9003)
    with pytest.raises(ConfigError, match="cores"):
        plan_replicas(_launch("--replicas", str(len(cores) + 1), "--device", "cpu"), [])
    with pytest.raises(ConfigError, match="at least 1"):
        plan_replicas(_launch("--replicas", "0", "--device", "cpu"), [])


def test_gpu_replicas_get_their_own_tp_devices() -> None:
    a, b = plan_replicas(_launch("--replicas", "2", "--device", "cuda", "--tp", "2"), [])
    assert (a.gpus, b.gpus, a.cpus, b.cpus) == ([0, 1], [2, 3], None, None)


def test_launch_refuses_a_grpc_port() -> None:
    with pytest.raises(ConfigError, match="per replica"):
        run_launch(_launch("--grpc-port", "5000"), [])
