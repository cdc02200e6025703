"""AsyncLLM: the frontend half of the engine. It lives in the server process (tokenizer, chat
template, incremental detokenization, stop strings, streaming) and drives the engine-core
process (engine/core_proc.py) over ZMQ with msgspec messages.

Contracts:
- `await AsyncLLM.start(...)` returns once the engine is ready, or raises EngineStartError.
- `generate()` yields RequestDelta objects for one request (all its n samples) until every
  sample finished. Leaving the iterator early (client gone, task cancelled) aborts the
  request's unfinished samples, which frees their KV pages in the engine.
- If the engine process dies or fails, every live request ends at once with an error delta
  (finish_reason "error") and `healthy` turns False; new requests raise EngineDeadError.
- At most `max_queue` requests are live at once; more raise Overloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Sequence

import msgspec
import zmq
import zmq.asyncio

from agentspeed.config import EngineConfig
from agentspeed.control.kv_events import KvEvent
from agentspeed.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineFailed,
    EngineOutput,
    EngineOutputs,
    EngineReady,
    EngineStats,
    FlushCache,
    Shutdown,
)
from agentspeed.engine.output_processor import OutputProcessor, RequestDelta
from agentspeed.errors import AgentspeedError
from agentspeed.launch import free_port
from agentspeed.sampling_params import SamplingParams
from agentspeed.tokenizer import Tokenizer

log = logging.getLogger("agentspeed.async_llm")


class EngineStartError(AgentspeedError):
    """The engine process failed to start (bad model, out of memory, ...)."""


class EngineDeadError(AgentspeedError):
    """The engine process is gone; no request can be served."""


class Overloaded(AgentspeedError):
    """Too many live requests (past --max-queue)."""


class AsyncLLM:
    def __init__(self) -> None:  # use AsyncLLM.start()
        self.tokenizer: Tokenizer | None = None
        self.info: EngineReady | None = None
        self.stats = EngineStats(0, 0, 0, 0, 0, 0)
        self.max_queue = 0
        self.dead: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctx = zmq.asyncio.Context()
        self._tmp = tempfile.TemporaryDirectory(prefix="agentspeed-")
        self._in = self._ctx.socket(zmq.PUSH)
        self._out = self._ctx.socket(zmq.PULL)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(EngineOutput)
        self.processor = OutputProcessor(None, ())
        self._queues: dict[str, asyncio.Queue[RequestDelta]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.generation_tokens = 0
        self.started_at = time.time()
        # Called with each step's prefix-cache events (with the engine's stats already
        # updated), when the engine reports them (SchedulingConfig.kv_events).
        self.kv_event_listeners: list[Callable[[list[KvEvent]], None]] = []

    # ---- lifecycle ----------------------------------------------------------------------
    @classmethod
    async def start(cls, cfg: EngineConfig, *, served_model_name: str | None = None,
                    chat_template: str | None = None, max_queue: int = 1024, log_level: str = "warning",
                    startup_timeout: float = 600.0) -> AsyncLLM:
        self = cls()
        self.max_queue = max_queue
        in_addr = f"ipc://{self._tmp.name}/input"
        out_addr = f"ipc://{self._tmp.name}/output"
        self._in.bind(in_addr)
        self._out.bind(out_addr)
        if cfg.parallel.tp > 1:
            cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, master_port=free_port()))
        cmd = [sys.executable, "-m", "agentspeed.engine.core_proc",
               "--config", msgspec.json.encode(cfg).decode(),
               "--input", in_addr, "--output", out_addr, "--log-level", log_level]
        if served_model_name:
            cmd += ["--served-model-name", served_model_name]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            # The tokenizer loads here while the engine loads the weights there.
            from agentspeed.model_source import resolve_model

            source = resolve_model(cfg.model)
            self.tokenizer = await asyncio.to_thread(Tokenizer.load, source, chat_template)
            self.info = await self._wait_ready(startup_timeout)
            if str(source.path) != self.info.model_path:  # one resolver (model_source.py): cannot differ
                raise EngineStartError(f"the engine loaded {self.info.model_path}, the tokenizer {source.path}")
        except BaseException:
            await self.shutdown(drain_timeout=0)
            raise
        self.processor = OutputProcessor(self.tokenizer, [*self.info.eos_token_ids, *self.tokenizer.eos_token_ids])
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watch())]
        return self

    async def _wait_ready(self, timeout: float) -> EngineReady:
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if await self._out.poll(200):
                msg = self._dec.decode(await self._out.recv())
                if isinstance(msg, EngineReady):
                    return msg
                if isinstance(msg, EngineFailed):
                    raise EngineStartError(msg.message)
            if self._proc.poll() is not None:
                raise EngineStartError(f"the engine process exited with code {self._proc.returncode} during startup")
        raise EngineStartError(f"the engine was not ready after {timeout:.0f}s")

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Wait up to drain_timeout for live requests, then stop the engine (killing it if it
        does not exit within a few seconds)."""
        deadline = time.monotonic() + drain_timeout
        while self._queues and self.dead is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(zmq.ZMQError):
                await self._in.send(self._enc.encode(Shutdown()), zmq.NOBLOCK)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._fail_all("the server is shutting down")
        self.dead = self.dead or "shut down"
        self._ctx.destroy(linger=0)
        self._tmp.cleanup()

    @property
    def healthy(self) -> bool:
        return self.dead is None and self._proc is not None and self._proc.poll() is None

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def num_live_requests(self) -> int:
        return len(self._queues)

    # ---- requests -----------------------------------------------------------------------
    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        return self.processor.stop_token_ids(params)

    async def generate(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                       session_key: str | None = None, cache_salt: str | None = None,
                       priority: int = 0, forced_output: Sequence[int] | None = None
                       ) -> AsyncGenerator[RequestDelta, None]:
        """Deltas of all of the request's n samples until each finished. forced_output is a
        test hook (OutputProcessor.add_request)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is not running ({self.dead})")
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id!r}")
        if len(self._queues) >= self.max_queue:
            raise Overloaded(f"the server is at its limit of {self.max_queue} live requests; retry later")
        spec = self.processor.add_request(request_id, prompt_ids, params, session_key=session_key,
                                          cache_salt=cache_salt, priority=priority, forced_output=forced_output)
        queue: asyncio.Queue[RequestDelta] = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            await self._in.send(self._enc.encode(AddRequest(spec)))
            left = params.n
            while left:
                d = await queue.get()
                if d.finish_reason is not None:
                    left -= 1
                yield d
        finally:
            self._queues.pop(request_id, None)
            unfinished = self.processor.abort(request_id)
            if unfinished and self.dead is None:
                with contextlib.suppress(zmq.ZMQError):
                    await self._in.send(self._enc.encode(AbortRequests(unfinished)))

    async def abort(self, request_id: str) -> bool:
        """End a live request now: its unfinished samples get a finish_reason "abort" delta
        (so its generate() iterator ends normally) and the engine frees their pages. False
        if no such request is live."""
        q = self._queues.get(request_id)
        if q is None:
            return False
        running, deltas = self.processor.abort_deltas(request_id)
        for d in deltas:
            q.put_nowait(d)
        if running and self.dead is None:
            await self._in.send(self._enc.encode(AbortRequests(running)))
        return True

    async def flush_cache(self) -> None:
        """Evict every cached prefix page no live request holds (applied before any request
        sent after this call)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is not running ({self.dead})")
        await self._in.send(self._enc.encode(FlushCache()))

    # ---- engine outputs -----------------------------------------------------------------
    async def _output_loop(self) -> None:
        while True:
            msg = self._dec.decode(await self._out.recv())
            if isinstance(msg, EngineOutputs):
                self.stats = msg.stats
                done = self.processor.process(msg.updates)
                for spec in done.submit:
                    await self._in.send(self._enc.encode(AddRequest(spec)))
                for rid, d in done.deltas:
                    self.generation_tokens += len(d.token_ids)
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait(d)
                if done.abort:
                    await self._in.send(self._enc.encode(AbortRequests(done.abort)))
                if msg.kv_events:
                    for listener in self.kv_event_listeners:
                        listener(msg.kv_events)
            elif isinstance(msg, EngineFailed):
                self._engine_gone(msg.message)
                return

    async def _watch(self) -> None:
        assert self._proc is not None
        while self._proc.poll() is None:
            await asyncio.sleep(0.2)
        self._engine_gone(f"the engine process exited with code {self._proc.returncode}")

    def _engine_gone(self, why: str) -> None:
        if self.dead is None:
            log.error("engine failed: %s", why)
            self.dead = why
        self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        for rid, d in self.processor.fail_all(why):
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(d)
