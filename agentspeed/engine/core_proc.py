"""The engine-core process: scheduler + model runner in a busy loop, fed over ZMQ.

    frontend --PUSH--> [input]  engine core (rank 0)  --PUSH--> [output] frontend
                                     |  StepInputs per step (PUSH, one socket per worker)
                                     v
                              TP workers (ranks 1..tp-1)

Contract with the frontend (AsyncLLM): the first message out is EngineReady or EngineFailed.
Then every step that produced updates sends one EngineOutputs. Shutdown ends the loop; so
does the death of the frontend process (the engine never outlives it). Any exception in a
step is sent as EngineFailed before the process exits non-zero, so in-flight requests fail
fast instead of hanging.

Tensor parallelism: every rank runs the same deterministic scheduler. Rank 0 forwards the
inputs it applies before each step to the workers, which apply the same inputs and step in
lock-step (the model's collectives keep them together; sampled tokens come from rank 0).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

import msgspec
import zmq

from agentspeed import launch
from agentspeed.config import EngineConfig
from agentspeed.control.plan import RequestUpdate
from agentspeed.engine.core import EngineCore
from agentspeed.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineFailed,
    EngineInput,
    EngineOutputs,
    EngineReady,
    EngineStats,
    FlushCache,
    Shutdown,
    StepInputs,
)

log = logging.getLogger("agentspeed.engine")

_IDLE_POLL_MS = 100


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so no engine outlives its server."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Core:
    """One rank's loop state."""

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.now = 0.0  # this iteration's time: rank 0's clock, sent to the workers
        engine.clock = lambda: self.now

    def apply(self, msgs: Sequence[EngineInput]) -> bool:
        """Apply inputs; False once a Shutdown was among them."""
        for m in msgs:
            if isinstance(m, AddRequest):
                self.engine.add_request(m.spec)
            elif isinstance(m, AbortRequests):
                for rid in m.request_ids:
                    self.engine.abort(rid)
            elif isinstance(m, FlushCache):
                n = self.engine.scheduler.flush_cache()
                log.info("prefix cache flushed: %d pages evicted", n)
            elif isinstance(m, Shutdown):
                return False
        return True

    def step(self) -> list[RequestUpdate]:
        e = self.engine
        return e.step() if e.has_work() else e.scheduler.advance_idle()

    def stats(self) -> EngineStats:
        s = self.engine.scheduler
        w = s.wpool
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_pages_used=s.pool.num_in_use(),
            kv_pages_total=s.pool.num_usable, num_preemptions=s.num_preemptions, steps=self.engine.steps,
            num_draft_tokens=s.num_draft_tokens, num_accepted_tokens=s.num_accepted_tokens,
            kv_window_pages_used=w.num_in_use() if w is not None else 0,
            kv_window_pages_total=w.num_usable if w is not None else 0,
            num_spec_disabled_structured=self.engine.num_spec_disabled_structured,
            num_structured_requests=self.engine.structured.hits + self.engine.structured.misses,
            num_grammar_cache_hits=self.engine.structured.hits,
            num_partial_hit_tokens=s.num_partial_hit_tokens, kv_evictions=s.pool.evictions,
            num_tier_hit_tokens=s.num_tier_hit_tokens,
            kv_tier_pages_used=len(s.tier) if s.tier is not None else 0,
            kv_tier_pages_total=s.tier.num_slots if s.tier is not None else 0,
            kv_tier_stores=s.tier.stores if s.tier is not None else 0,
            kv_tier_writebacks=s.num_tier_writebacks,
            num_disk_hit_tokens=s.num_disk_hit_tokens,
            kv_disk_pages_used=len(s.disk) if s.disk is not None else 0,
            kv_disk_pages_total=s.disk.num_slots if s.disk is not None else 0,
            kv_disk_failed=s.num_disk_failed,
        )


def _worker_input(base: str, rank: int) -> str:
    return f"{base}-rank{rank}"


def _spawn_workers(args: argparse.Namespace, cfg: EngineConfig, ctx: zmq.Context[zmq.Socket[bytes]]
                   ) -> tuple[list[subprocess.Popen[bytes]], list[zmq.Socket[bytes]]]:
    """Ranks 1..tp-1 through the one TP launcher (agentspeed/launch.py): this same program,
    told its rank by the environment; each pulls its StepInputs from its own socket."""
    socks = []
    for rank in range(1, cfg.parallel.tp):
        sock = ctx.socket(zmq.PUSH)
        sock.bind(_worker_input(args.input, rank))
        socks.append(sock)
    argv = ["-m", "agentspeed.engine.core_proc", "--config", args.config, "--input", args.input,
            "--log-level", args.log_level]
    return launch.spawn_workers(cfg.parallel.tp, cfg.parallel.master_port, argv), socks


def run_rank0(args: argparse.Namespace, cfg: EngineConfig) -> int:
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(EngineInput)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(args.input)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 5000)
    out.connect(args.output)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        workers, worker_socks = _spawn_workers(args, cfg, ctx)
        engine = EngineCore.build(cfg)
        runner = engine.runner
        name = args.served_model_name or runner.source.name
        out.send(enc.encode(EngineReady(
            name, str(runner.source.path), runner.max_model_len, runner.page_size, runner.kv.num_pages,
            list(runner.model_config.eos_token_ids), runner.kv.bytes_per_token,
            engine.cfg.scheduling.num_speculative_tokens or 0, bool(engine.cfg.scheduling.overlap),
            "; ".join(runner.kernels.numerics_notes()), runner.model_config.architecture,
            runner.model_config.vocab_size, str(runner.dtype).removeprefix("torch."), str(runner.device),
            engine.cfg.scheduling.max_num_seqs,
        )))
    except Exception as e:
        out.send(enc.encode(EngineFailed(f"engine startup failed: {e}")))
        for w in workers:
            w.kill()
        log.error("engine startup failed: %s", e)
        return 1

    core = _Core(engine)
    parent = os.getppid()
    rc = 0
    try:
        running = True
        while running:
            idle = not engine.has_work()
            msgs: list[EngineInput] = []
            if inp.poll(_IDLE_POLL_MS if idle else 0):
                while True:
                    try:
                        msgs.append(dec.decode(inp.recv(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
            if idle and not msgs:
                if os.getppid() != parent:
                    log.warning("frontend process is gone; engine exits")
                    break
                continue
            core.now = time.monotonic()
            if worker_socks:
                c = engine.scheduler.tier_cost
                buf = enc.encode(StepInputs(msgs, core.now, (c.load_s, c.fetch_s, c.prefill_s)))
                for s in worker_socks:
                    s.send(buf)
            running = core.apply(msgs)
            if not running:
                break
            updates = core.step()
            events = engine.scheduler.kv_events.drain() if engine.scheduler.kv_events.enabled else []
            if updates or events:
                out.send(enc.encode(EngineOutputs(updates, core.stats(), events)))
    except Exception as e:
        log.error("engine step failed:\n%s", traceback.format_exc())
        out.send(enc.encode(EngineFailed(f"engine step failed: {type(e).__name__}: {e}")))
        rc = 1
    finally:
        try:
            engine.shutdown()
        finally:
            for w in workers:
                try:
                    w.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    w.kill()
            ctx.destroy(linger=2000)
    return rc


def run_worker(args: argparse.Namespace, cfg: EngineConfig) -> int:
    dec = msgspec.msgpack.Decoder(StepInputs)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(_worker_input(args.input, cfg.parallel.rank))
    engine = EngineCore.build(cfg)
    engine.measure_tier_cost = False
    core = _Core(engine)
    cost = engine.scheduler.tier_cost
    try:
        while True:
            if not inp.poll(1000):
                continue
            si = dec.decode(inp.recv())
            core.now = si.now
            cost.load_s, cost.fetch_s, cost.prefill_s = si.tier_cost
            if not core.apply(si.inputs):
                break
            core.step()
    finally:
        engine.shutdown()
        ctx.destroy(linger=0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="agentspeed engine-core process (started by AsyncLLM)")
    ap.add_argument("--config", required=True, help="EngineConfig as JSON")
    ap.add_argument("--input", required=True, help="ZMQ address to pull inputs from")
    ap.add_argument("--output", default=None, help="ZMQ address to push outputs to (rank 0)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    rank = launch.worker_rank()
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s engine[{rank}] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the frontend decides
    _die_with_parent()
    cfg = msgspec.json.decode(args.config.encode(), type=EngineConfig)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, rank=rank))
    return run_worker(args, cfg) if rank else run_rank0(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
