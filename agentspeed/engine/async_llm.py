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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from agentspeed.config import EngineConfig
from agentspeed.control.plan import RequestSpec, RequestUpdate
from agentspeed.engine.core import SchedulingOptions
from agentspeed.engine.detokenizer import IncrementalDetokenizer
from agentspeed.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineFailed,
    EngineOutput,
    EngineOutputs,
    EngineReady,
    EngineStats,
    Shutdown,
)
from agentspeed.errors import AgentspeedError
from agentspeed.execution.launch import free_port
from agentspeed.sampling_params import SamplingParams
from agentspeed.tokenizer import Tokenizer

log = logging.getLogger("agentspeed.async_llm")


class EngineStartError(AgentspeedError):
    """The engine process failed to start (bad model, out of memory, ...)."""


class EngineDeadError(AgentspeedError):
    """The engine process is gone; no request can be served."""


class Overloaded(AgentspeedError):
    """Too many live requests (past --max-queue)."""


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(slots=True)
class RequestDelta:
    """What one sample of a request gained since the last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class _Sample:
    request: _Request
    index: int
    rid: str  # the engine's request id
    spec: RequestSpec
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    forced: list[int] | None = None  # test hook: the tokens shown instead of the sampled ones
    num_tokens: int = 0
    done: bool = False


@dataclass(slots=True)
class _Request:
    request_id: str
    queue: asyncio.Queue[RequestDelta]
    samples: list[_Sample] = field(default_factory=list)
    pending_siblings: list[_Sample] = field(default_factory=list)


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
        self._samples: dict[str, _Sample] = {}
        self._requests: dict[str, _Request] = {}
        self._eos: frozenset[int] = frozenset()
        self._tasks: list[asyncio.Task[None]] = []
        self.generation_tokens = 0

    # ---- lifecycle ----------------------------------------------------------------------
    @classmethod
    async def start(cls, cfg: EngineConfig, opts: SchedulingOptions, *, served_model_name: str | None = None,
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
               "--scheduling", msgspec.json.encode(opts).decode(),
               "--input", in_addr, "--output", out_addr, "--log-level", log_level]
        if served_model_name:
            cmd += ["--served-model-name", served_model_name]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            # The tokenizer loads here while the engine loads the weights there.
            from agentspeed.modeling.loaders.source import resolve_model

            source = resolve_model(cfg.model)
            self.tokenizer = await asyncio.to_thread(Tokenizer.load, source, chat_template)
            self.info = await self._wait_ready(startup_timeout)
        except BaseException:
            await self.shutdown(drain_timeout=0)
            raise
        eos = list(self.info.eos_token_ids) + list(self.tokenizer.eos_token_ids)
        self._eos = frozenset(eos)
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
        while self._requests and self.dead is None and time.monotonic() < deadline:
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
        return len(self._requests)

    # ---- requests -----------------------------------------------------------------------
    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos)

    async def generate(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                       session_key: str | None = None, cache_salt: str | None = None,
                       priority: int = 0, forced_output: Sequence[int] | None = None
                       ) -> AsyncIterator[RequestDelta]:
        """forced_output is a test hook: the engine runs the request for real (as many tokens
        as forced_output has, EOS ignored) but the frontend substitutes these tokens for the
        sampled ones, so parsers downstream see a known text."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is not running ({self.dead})")
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if len(self._requests) >= self.max_queue:
            raise Overloaded(f"the server is at its limit of {self.max_queue} live requests; retry later")
        req = _Request(request_id, asyncio.Queue())
        if forced_output is not None:
            params = msgspec.structs.replace(params, max_tokens=max(1, len(forced_output)), ignore_eos=True)
        for i in range(params.n):
            p = params
            if params.n > 1:
                p = msgspec.structs.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            rid = request_id if i == 0 else f"{request_id}-{i}"
            spec = RequestSpec(rid, tuple(prompt_ids), p.max_tokens, p.min_tokens, self.stop_token_ids(p),
                               priority, session_key, cache_salt)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, p.stop, p.skip_special_tokens,
                                               p.include_stop_str_in_output)
            forced = list(forced_output) if forced_output is not None else None
            req.samples.append(_Sample(req, i, rid, spec, p, detok, forced))
        # Siblings start when the first sample's prefill is done, so they hit its pages in
        # the prefix cache instead of computing the prompt n times.
        req.pending_siblings = req.samples[1:]
        self._requests[request_id] = req
        try:
            await self._submit(req.samples[0])
            left = params.n
            while left:
                d = await req.queue.get()
                if d.finish_reason is not None:
                    left -= 1
                yield d
        finally:
            unfinished = [s.rid for s in req.samples if not s.done]
            for s in req.samples:
                s.done = True
                self._samples.pop(s.rid, None)
            self._requests.pop(request_id, None)
            if unfinished and self.dead is None:
                with contextlib.suppress(zmq.ZMQError):
                    await self._in.send(self._enc.encode(AbortRequests(unfinished)))

    async def _submit(self, s: _Sample) -> None:
        self._samples[s.rid] = s
        await self._in.send(self._enc.encode(AddRequest(s.spec, s.params)))

    # ---- engine outputs -----------------------------------------------------------------
    async def _output_loop(self) -> None:
        while True:
            msg = self._dec.decode(await self._out.recv())
            if isinstance(msg, EngineOutputs):
                self.stats = msg.stats
                aborts: list[str] = []
                for u in msg.updates:
                    s = self._samples.get(u.request_id)
                    if s is not None and not s.done:
                        await self._on_update(s, u, msg.logprobs.get(u.request_id), aborts)
                if aborts:
                    await self._in.send(self._enc.encode(AbortRequests(aborts)))
            elif isinstance(msg, EngineFailed):
                self._engine_gone(msg.message)
                return

    async def _on_update(self, s: _Sample, u: RequestUpdate, lp: tuple[float, tuple[tuple[int, float], ...]] | None,
                         aborts: list[str]) -> None:
        req = s.request
        if req.pending_siblings:
            sibs, req.pending_siblings = req.pending_siblings, []
            for sib in sibs:
                await self._submit(sib)
        new = list(u.new_token_ids)
        if s.forced is not None:
            new = s.forced[s.num_tokens : s.num_tokens + len(new)]
        s.num_tokens += len(new)
        self.generation_tokens += len(new)
        finish = u.finish_reason.value if u.finish_reason is not None else None
        stop_reason: int | str | None = None
        if finish == "stop" and new and new[-1] in s.spec.stop_token_ids and new[-1] not in self._eos:
            stop_reason = new[-1]
        text = ""
        if s.detok is not None:
            # A stop token is not part of the text (EOS included).
            shown = new[:-1] if finish == "stop" and new and new[-1] in s.spec.stop_token_ids else new
            text = s.detok.update(shown, finish is not None)
            if s.detok.stopped and finish is None:
                finish, stop_reason = "stop", s.detok.stop_reason
                aborts.append(s.rid)
        logprobs = None
        if s.params.logprobs is not None and lp is not None and new:
            logprobs = [TokenLogprob(new[-1], lp[0], lp[1])]
        if finish is not None:
            s.done = True
            self._samples.pop(s.rid, None)
        if finish == "error" and not new and u.message:
            req.queue.put_nowait(RequestDelta(s.index, "", [], None, "error", None, 0, u.message))
            return
        req.queue.put_nowait(RequestDelta(s.index, text, new, logprobs, finish, stop_reason,
                                          u.num_cached_tokens))

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
        for req in list(self._requests.values()):
            for s in req.samples:
                if not s.done:
                    s.done = True
                    req.queue.put_nowait(RequestDelta(s.index, "", [], None, "error", None, 0, why))
        self._samples.clear()

