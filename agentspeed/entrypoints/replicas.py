"""`agentspeed launch`: N engine replicas behind the Shepherd Model Gateway, in one command.

What it does, in order:
1. starts N `agentspeed serve` processes on 127.0.0.1, each with an HTTP port and a gRPC
   worker port, each pinned to its share of this process's CPU cores (sched_setaffinity,
   and as many OpenMP threads) or, on GPUs, to its own `--tp` devices (CUDA_VISIBLE_DEVICES);
2. waits until every replica's /health answers;
3. starts SMG (`python -m smg launch`, PyPI tokenspeed-smg) on --host:--port with the replicas
   as workers: gRPC by default (the gateway tokenizes, parses tools and reasoning, and routes
   by the replicas' KV events), plain HTTP with --worker-protocol http;
4. streams every process's output with a prefix ([replica i], [smg]);
5. restarts a replica that dies, after a backoff that doubles from 1 s to 30 s (reset once a
   replica has stayed up for 60 s); the gateway routes around it meanwhile, so its in-flight
   requests fail at once and new ones go to the others;
6. on Ctrl-C or SIGTERM stops the gateway, then lets every replica drain (SIGTERM, up to its
   --drain-timeout) and kills what is left.

The `serve` options given to `launch` are passed on to each replica's `agentspeed serve`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import httpx

from agentspeed.errors import ConfigError
from agentspeed.launch import free_port

BACKOFF_MIN_S, BACKOFF_MAX_S, STABLE_S = 1.0, 30.0, 60.0
POLICIES = ("cache_aware", "consistent_hashing", "round_robin", "random", "power_of_two", "least_load",
            "prefix_hash")


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                   help="local HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g = p.add_argument_group("replicas and gateway")
    g.add_argument("--replicas", type=int, default=2, help="engine replicas to start (default 2)")
    g.add_argument("--policy", default="cache_aware", choices=POLICIES,
                   help="the gateway's routing policy (default cache_aware: by cached prefix, from the "
                        "replicas' KV events over gRPC)")
    g.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="the gateway's port (default 8000)")
    g.add_argument("--worker-protocol", default="grpc", choices=["grpc", "http"],
                   help="how the gateway talks to the replicas (default grpc: token ids, KV events, pushed loads)")
    g.add_argument("--replica-port-base", type=int, default=None, metavar="B",
                   help="replica i serves HTTP on B+2i and gRPC on B+2i+1 (default: free ports)")
    g.add_argument("--cores-per-replica", type=int, default=None, metavar="C",
                   help="CPU cores pinned to each replica (default: this process's cores split evenly)")
    g.add_argument("--smg-args", default="", metavar="ARGS",
                   help="further gateway flags, one shell-quoted string, e.g. "
                        "\"--reasoning-parser qwen3 --tool-call-parser qwen\" (see python -m smg launch --help)")
    g.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for all replicas to become healthy")
    p.epilog = "The server and engine options below are passed to each replica's `agentspeed serve`."


@dataclass
class Replica:
    index: int
    http_port: int
    grpc_port: int
    cpus: list[int] | None
    gpus: list[int] | None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_MIN_S
    restart_at: float | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def worker_url(self, protocol: str) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}" if protocol == "grpc" else self.url


def _pump(stream: IO[bytes], prefix: str) -> None:
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        out.write(prefix.encode() + line)
        out.flush()


def _spawn(cmd: Sequence[str], prefix: str, env: dict[str, str], cpus: list[int] | None) -> subprocess.Popen[bytes]:
    """Start cmd with its output streamed under `prefix` (a daemon thread per process)."""
    def pin() -> None:
        os.setpgrp()  # our own group: a Ctrl-C reaches the launcher, which stops children in order
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(proc.stdout, prefix), daemon=True).start()
    return proc


def plan_replicas(args: argparse.Namespace, serve_args: Sequence[str]) -> list[Replica]:
    n = args.replicas
    if n < 1:
        raise ConfigError("--replicas must be at least 1")
    gpu = args.device == "cuda" or (args.device == "auto" and _cuda_available())
    tp = args.tp
    cores = sorted(os.sched_getaffinity(0))
    per = args.cores_per_replica or max(1, len(cores) // n)
    if not gpu and per * n > len(cores):
        raise ConfigError(f"{n} replicas x {per} cores need {per * n} cores; this process may use {len(cores)}")
    reps = []
    for i in range(n):
        hp, gp = ((args.replica_port_base + 2 * i, args.replica_port_base + 2 * i + 1)
                  if args.replica_port_base is not None else (free_port(), free_port()))
        reps.append(Replica(i, hp, gp, None if gpu else cores[i * per : (i + 1) * per],
                            list(range(i * tp, (i + 1) * tp)) if gpu else None))
    return reps


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


class Launcher:
    def __init__(self, args: argparse.Namespace, serve_args: Sequence[str]) -> None:
        self.args = args
        self.serve_args = list(serve_args)
        self.replicas = plan_replicas(args, serve_args)
        self.smg: subprocess.Popen[bytes] | None = None
        self.metrics_port: int | None = None
        self.stopping = False

    def _start_replica(self, r: Replica) -> None:
        cmd = [sys.executable, "-m", "agentspeed.cli", "serve"]
        if self.args.model_path:
            cmd.append(self.args.model_path)
        cmd += ["--host", "127.0.0.1", "--port", str(r.http_port), *self.serve_args]
        if self.args.worker_protocol == "grpc":
            cmd += ["--grpc-port", str(r.grpc_port)]
        env = dict(os.environ)
        if r.cpus is not None:
            env["OMP_NUM_THREADS"] = str(len(r.cpus))
        if r.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, r.gpus))
        r.proc = _spawn(cmd, f"[replica {r.index}] ", env, r.cpus)
        r.started = time.monotonic()
        r.restart_at = None
        where = f"cores {r.cpus}" if r.cpus is not None else f"GPUs {r.gpus}"
        self.say(f"replica {r.index}: http {r.url}, grpc 127.0.0.1:{r.grpc_port}, {where} (pid {r.proc.pid})")

    def say(self, msg: str) -> None:
        print(f"[launch] {msg}", flush=True)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.args.startup_timeout
        pending = set(range(len(self.replicas)))
        while pending:
            if self.stopping:
                raise KeyboardInterrupt
            for i in list(pending):
                r = self.replicas[i]
                assert r.proc is not None
                if r.proc.poll() is not None:
                    raise ConfigError(f"replica {i} exited during startup (code {r.proc.returncode}); see its log above")
                try:
                    if httpx.get(f"{r.url}/health", timeout=2).status_code == 200:
                        pending.discard(i)
                        self.say(f"replica {i} is healthy")
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise ConfigError(f"replicas {sorted(pending)} not healthy after {self.args.startup_timeout:.0f}s")
            time.sleep(0.5)

    def _start_smg(self) -> None:
        urls = [r.worker_url(self.args.worker_protocol) for r in self.replicas]
        cmd = [sys.executable, "-m", "smg", "launch", "--host", self.args.host, "--port", str(self.args.port),
               "--policy", self.args.policy, "--worker-urls", *urls,
               # Probe often enough that a dead replica leaves the rotation within seconds.
               "--health-check-interval-secs", "2", "--health-failure-threshold", "1"]
        extra = shlex.split(self.args.smg_args)
        if "--prometheus-port" not in extra:  # its default (29000) would clash between gateways
            self.metrics_port = free_port()
            cmd += ["--prometheus-port", str(self.metrics_port), "--prometheus-host", "127.0.0.1"]
        cmd += extra
        self.smg = _spawn(cmd, "[smg] ", dict(os.environ), None)
        metrics = f", metrics http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else ""
        self.say(f"gateway: http://{self.args.host}:{self.args.port}/v1 ({self.args.policy}, "
                 f"{self.args.worker_protocol} to {len(urls)} replicas{metrics})")

    def _wait_gateway(self) -> None:
        url = f"http://{_connect_host(self.args.host)}:{self.args.port}"
        deadline = time.monotonic() + 120
        while not self.stopping:
            assert self.smg is not None
            if self.smg.poll() is not None:
                raise ConfigError(f"the gateway exited during startup (code {self.smg.returncode}); see its log above")
            try:
                if httpx.get(f"{url}/readiness", timeout=2).status_code == 200:
                    self.say(f"ready: {url}/v1")
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError("the gateway was not ready after 120s")
            time.sleep(0.3)

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            for r in self.replicas:
                self._start_replica(r)
            self._wait_healthy()
            self._start_smg()
            self._wait_gateway()
            self._supervise()
        except KeyboardInterrupt:
            pass
        finally:
            self._stop_all()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.say(f"{signal.Signals(signum).name}: stopping the gateway, then draining the replicas")
        self.stopping = True

    def _supervise(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            if self.smg is not None and self.smg.poll() is not None:
                self.say(f"the gateway exited (code {self.smg.returncode}); stopping")
                return
            for r in self.replicas:
                assert r.proc is not None
                if r.restart_at is None and r.proc.poll() is not None:
                    if now - r.started >= STABLE_S:
                        r.backoff = BACKOFF_MIN_S
                    r.restart_at = now + r.backoff
                    self.say(f"replica {r.index} exited (code {r.proc.returncode}); restarting in {r.backoff:.0f}s")
                    r.backoff = min(r.backoff * 2, BACKOFF_MAX_S)
                elif r.restart_at is not None and now >= r.restart_at:
                    r.restarts += 1
                    self._start_replica(r)
            time.sleep(0.2)

    def _stop_all(self) -> None:
        self.stopping = True
        if self.smg is not None and self.smg.poll() is None:
            self.smg.send_signal(signal.SIGTERM)
            _wait_or_kill(self.smg, 15.0)
        live = [r.proc for r in self.replicas if r.proc is not None and r.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        drain = self.args.drain_timeout
        for p in live:
            _wait_or_kill(p, drain + 15.0)
        self.say("stopped")


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _wait_or_kill(p: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def run_launch(args: argparse.Namespace, serve_args: Sequence[str]) -> int:
    """serve_args: the serve options to pass to each replica (cli.serve_argv)."""
    if args.grpc_port is not None:
        raise ConfigError("--grpc-port is chosen per replica here (see --replica-port-base)")
    return Launcher(args, serve_args).run()
