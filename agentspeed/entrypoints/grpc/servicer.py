"""The gRPC worker: `tokenspeed.grpc.scheduler.TokenSpeedScheduler` over the server's AsyncLLM.

This is the interface the Shepherd Model Gateway (SMG) drives when it routes to a worker
over gRPC: the gateway tokenizes, applies the chat template and parses tools and reasoning;
the worker takes token ids and streams token ids back. The service is the one defined in
PyPI tokenspeed-smg-grpc-proto (its generated stubs are used as they are), next to the
standard grpc.health.v1 service, through which the gateway recognises the backend.

Generate contract, as SMG reads it: with `stream`, each engine delta of a sample is a
`GenerateStreamChunk` (its new token ids; the first one of a sample is sent even when
empty) and the sample ends with a `GenerateComplete` holding the last delta's ids; without
`stream`, one `GenerateComplete` per sample holds all its ids. A stop token that ended a
sample is left out of the ids (unless `no_stop_trim`) and named in `matched_token_id`; a
stop string in `matched_stop_str`. The stream ends once every sample is complete. An
aborted request (Abort, or the client cancelled the stream) frees its KV at once; a request
the engine refuses ends with INVALID_ARGUMENT, an engine that is gone with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import tokenspeed_scheduler_pb2 as pb
from smg_grpc_proto.generated import tokenspeed_scheduler_pb2_grpc as pb_grpc

from agentspeed.entrypoints import loads
from agentspeed.entrypoints.errors import APIError
from agentspeed.entrypoints.grpc.convert import (
    InvalidRequest,
    generate_inputs,
    output_logprobs,
    tokenizer_zip,
)
from agentspeed.entrypoints.grpc.kv_publisher import KvEventPublisher
from agentspeed.entrypoints.openai.serving import RunStats, ServerState, new_id, run_request

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TokenSpeedScheduler"].full_name
SESSION_METADATA = ("x-smg-routing-key", "x-session-id")
_TOKENIZER_CHUNK = 1 << 20
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
           503: grpc.StatusCode.UNAVAILABLE}


def _session(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
    for key in SESSION_METADATA:
        v = md.get(key)
        if isinstance(v, str) and v:
            return v
    return None


class SchedulerServicer(pb_grpc.TokenSpeedSchedulerServicer):  # type: ignore[misc]
    def __init__(self, state: ServerState, publisher: KvEventPublisher | None) -> None:
        self.state = state
        self.publisher = publisher
        self._tokenizer_zip: tuple[bytes, str] | None = None

    # ---- generation -----------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
                       ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id or new_id("grpc")
        try:
            ids, params = generate_inputs(request, self.state)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        engine = self.state.engine
        stop_ids = engine.stop_token_ids(params)
        keep_stop = request.sampling_params.no_stop_trim
        stats = RunStats(len(ids))
        counts = [0] * params.n  # tokens generated per sample (the stop token included)
        outs: list[list[int]] = [[] for _ in range(params.n)]  # what each sample's ids are so far
        out_lps: list[list[Any]] = [[] for _ in range(params.n)]
        opened: set[int] = set()
        done = 0
        try:
            # (closed on return, not when collected: the request stays live until its generator ends)
            async with contextlib.aclosing(run_request(self.state, rid, ids, params, None, stats,
                                                       session=_session(context))) as deltas:
                async for d in deltas:
                    if d.finish_reason == "abort":
                        await context.abort(grpc.StatusCode.ABORTED, f"request {rid} was aborted")
                    i = d.index
                    toks = list(d.token_ids)
                    counts[i] += len(toks)
                    lps = list(d.logprobs) if d.logprobs is not None else None
                    matched: dict[str, Any] = {}
                    if d.finish_reason == "stop":
                        if toks and toks[-1] in stop_ids:
                            matched["matched_token_id"] = toks[-1]
                            if not keep_stop:
                                toks.pop()
                                lps = lps[: len(toks)] if lps is not None else None
                        elif isinstance(d.stop_reason, str):
                            matched["matched_stop_str"] = d.stop_reason
                    common = {"prompt_tokens": len(ids), "completion_tokens": counts[i],
                              "cached_tokens": d.num_cached_tokens, "index": i}
                    if request.stream:
                        if request.return_logprob and lps:
                            common["output_logprobs"] = output_logprobs(lps)
                        if toks or i not in opened:
                            opened.add(i)
                            yield pb.GenerateResponse(request_id=rid, chunk=pb.GenerateStreamChunk(token_ids=toks,
                                                                                                    **common))
                    else:  # one Complete with everything
                        outs[i] += toks
                        out_lps[i] += lps or []
                        toks, lps = outs[i], out_lps[i]
                        if request.return_logprob and lps:
                            common["output_logprobs"] = output_logprobs(lps)
                    if d.finish_reason is None:
                        continue
                    yield pb.GenerateResponse(request_id=rid, complete=pb.GenerateComplete(
                        output_ids=toks, finish_reason=d.finish_reason, **common, **matched))
                    done += 1
                    if done == params.n:
                        return
        except APIError as e:
            await context.abort(_STATUS.get(e.status, grpc.StatusCode.INTERNAL), e.message)
        except ValueError as e:  # a duplicate request id
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.AbortResponse:
        ok = await self.state.engine.abort(request.request_id)
        return pb.AbortResponse(success=ok, message="aborted" if ok else f"no live request {request.request_id!r}")

    # ---- reports --------------------------------------------------------------------------
    async def HealthCheck(self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
                          ) -> pb.HealthCheckResponse:
        engine = self.state.engine
        return pb.HealthCheckResponse(healthy=engine.healthy, message="ok" if engine.healthy else str(engine.dead))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
                           ) -> pb.GetModelInfoResponse:
        return loads.model_info(self.state)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
                            ) -> pb.GetServerInfoResponse:
        return loads.server_info(self.state)

    async def GetLoads(self, request: pb.GetLoadsRequest, context: grpc.aio.ServicerContext[Any, Any]
                       ) -> pb.GetLoadsResponse:
        if request.HasField("dp_rank") and request.dp_rank != 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dp_rank {request.dp_rank}: this worker has rank 0 only")
        return loads.get_loads(self.state)

    # ---- admin ----------------------------------------------------------------------------
    async def FlushCache(self, request: common_pb2.FlushCacheRequest, context: grpc.aio.ServicerContext[Any, Any]
                         ) -> common_pb2.FlushCacheResponse:
        engine = self.state.engine
        deadline = asyncio.get_running_loop().time() + max(request.timeout_s, 0.0)
        while engine.num_live_requests and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if engine.num_live_requests:
            return common_pb2.FlushCacheResponse(
                success=False, message=f"{engine.num_live_requests} requests in flight; retry with a timeout_s")
        await engine.flush_cache()
        return common_pb2.FlushCacheResponse(success=True, message="prefix cache flushed")

    async def StartProfile(self, request: common_pb2.StartProfileRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> common_pb2.ProfileResponse:
        return common_pb2.ProfileResponse(success=False, message="agentspeed has no profiler endpoint")

    async def StopProfile(self, request: common_pb2.StopProfileRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> common_pb2.ProfileResponse:
        return common_pb2.ProfileResponse(success=False, message="agentspeed has no profiler endpoint")

    async def GetTokenizer(self, request: common_pb2.GetTokenizerRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        tok = self.state.engine.tokenizer
        if tok is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this worker has no tokenizer")
        assert tok is not None
        if self._tokenizer_zip is None:
            data = await asyncio.to_thread(tokenizer_zip, tok)
            self._tokenizer_zip = data, hashlib.sha256(data).hexdigest()
        data, digest = self._tokenizer_zip
        for off in range(0, len(data), _TOKENIZER_CHUNK):
            last = off + _TOKENIZER_CHUNK >= len(data)
            yield common_pb2.GetTokenizerChunk(data=data[off : off + _TOKENIZER_CHUNK], sha256=digest if last else "")

    async def SubscribeKvEvents(self, request: common_pb2.SubscribeKvEventsRequest,
                                context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[common_pb2.KvEventBatch]:
        if self.publisher is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "KV events are off (the prefix cache is disabled)")
        assert self.publisher is not None
        async for batch in self.publisher.subscribe(request.start_sequence_number,
                                                    request.load_records_before_first_batch):
            yield batch


class GrpcWorker:
    """The gRPC server of one engine: started beside the HTTP server, on the same AsyncLLM."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                 watch: asyncio.Task[None]) -> None:
        self.server, self._health, self._watch = server, health_servicer, watch

    @classmethod
    async def start(cls, state: ServerState, host: str, port: int) -> GrpcWorker:
        publisher = None
        if state.kv_events:
            publisher = KvEventPublisher(lambda s, only, full: loads.engine_load(state, s, only, full),
                                         medium=state.engine.info.device if state.engine.info else "cpu")
            state.engine.kv_event_listeners.append(publisher.publish)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                          ("grpc.max_send_message_length", 256 << 20)])
        pb_grpc.add_TokenSpeedSchedulerServicer_to_server(SchedulerServicer(state, publisher), server)
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        if server.add_insecure_port(f"{host}:{port}") == 0:
            raise OSError(f"cannot listen for gRPC on {host}:{port}")
        await server.start()
        for name in ("", SERVICE_NAME):
            await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
        return cls(server, hs, asyncio.create_task(cls._watch_engine(state, hs)))

    @staticmethod
    async def _watch_engine(state: ServerState, hs: health.aio.HealthServicer) -> None:
        while state.engine.healthy:
            await asyncio.sleep(0.2)
        for name in ("", SERVICE_NAME):
            await hs.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        """Say NOT_SERVING, refuse new calls, let open ones finish for up to `grace` seconds."""
        self._watch.cancel()
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace)
