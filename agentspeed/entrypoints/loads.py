"""The worker's load, model and server reports, in the gateway's shapes.

SMG's least_load / power_of_two policies and its overload protection read a worker's load:
over gRPC from `GetLoads` and the load record on every KV-event batch, over HTTP from
`GET /v1/loads` (SGLang's route, the same fields as JSON). All of them are built here from
one snapshot, as the TokenSpeedScheduler protobuf messages (PyPI tokenspeed-smg-grpc-proto);
the HTTP routes render those messages as JSON with the proto's field names.

Token figures count KV pages held by live requests (`EngineStats.kv_pages_used`), not pages
that are merely cached: cached pages are reclaimable and must not make an idle worker look
full (the proto's `active_token_usage`).
"""

from __future__ import annotations

import datetime
import json
import time
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import tokenspeed_scheduler_pb2 as pb

from agentspeed import __version__

if TYPE_CHECKING:
    from agentspeed.entrypoints.openai.serving import ServerState


def _usage(state: ServerState) -> tuple[int, int, float]:
    st, info = state.engine.stats, state.engine.info
    page = info.page_size if info is not None else 1
    total = st.kv_pages_total * page if st.kv_pages_total else state.kv_tokens
    used = st.kv_pages_used * page
    return used, total, (used / total if total else 0.0)


def scheduler_load(state: ServerState) -> pb.SchedulerLoad:
    st = state.engine.stats
    used, total, usage = _usage(state)
    busy = st.num_running + st.num_waiting
    return pb.SchedulerLoad(
        dp_rank=0, num_running_reqs=st.num_running, num_waiting_reqs=st.num_waiting, num_total_reqs=busy,
        num_used_tokens=used, max_total_num_tokens=total, max_running_requests=state.max_running_requests,
        token_usage=usage, active_token_usage=usage, gen_throughput=state.metrics.throughput(),
        cache_hit_rate=state.metrics.cache_hit_rate(),
        utilization=min(1.0, st.num_running / state.max_running_requests) if state.max_running_requests else 0.0,
        queues=pb.QueueMetrics(waiting=st.num_waiting),
    )


def get_loads(state: ServerState) -> pb.GetLoadsResponse:
    load = scheduler_load(state)
    return pb.GetLoadsResponse(
        timestamp=datetime.datetime.now(datetime.UTC).isoformat(), version=__version__, dp_rank_count=1,
        loads=[load], aggregate=pb.AggregateMetrics(
            total_running_reqs=load.num_running_reqs, total_waiting_reqs=load.num_waiting_reqs,
            total_reqs=load.num_total_reqs, avg_token_usage=load.token_usage,
            avg_throughput=load.gen_throughput, avg_utilization=load.utilization))


def engine_load(state: ServerState, sample: int, load_only: bool, full: bool) -> common_pb2.EngineLoad:
    """The load record a KV-event batch carries; `full` adds the telemetry fields (sent on
    heartbeats and a stream's first record, as the proto asks)."""
    load = scheduler_load(state)
    rec = common_pb2.EngineLoad(
        running_requests=load.num_running_reqs, waiting_requests=load.num_waiting_reqs,
        token_usage=load.token_usage, active_token_usage=load.active_token_usage,
        gen_throughput=load.gen_throughput, max_running_requests=load.max_running_requests,
        sample=sample, load_only=load_only)
    if full:
        rec.cache_hit_rate = load.cache_hit_rate
        rec.num_used_tokens = load.num_used_tokens
        rec.max_total_num_tokens = load.max_total_num_tokens
        rec.queues.CopyFrom(common_pb2.EngineQueues(waiting=load.num_waiting_reqs))
    return rec


def model_info(state: ServerState) -> pb.GetModelInfoResponse:
    info, tok = state.engine.info, state.engine.tokenizer
    assert info is not None
    hf = tok.hf if tok is not None else None
    path = info.model_path
    gguf = path.endswith(".gguf")
    return pb.GetModelInfoResponse(
        model_path=path,
        # A GGUF file is no tokenizer directory: the gateway fetches ours (GetTokenizer).
        tokenizer_path="" if gguf else path,
        served_model_name=state.model_name,
        model_type=info.architecture.removesuffix("ForCausalLM").lower(),
        architectures=[info.architecture] if info.architecture else [],
        max_context_length=info.max_model_len, max_req_input_len=info.max_model_len - 1,
        vocab_size=info.vocab_size, eos_token_ids=list(info.eos_token_ids),
        pad_token_id=_token_id(hf, "pad_token_id"), bos_token_id=_token_id(hf, "bos_token_id"),
        model_dtype=info.dtype, supports_vision=False, supports_multimodal=False)


def _token_id(hf: Any, name: str) -> int:
    v = getattr(hf, name, None) if hf is not None else None
    return int(v) if isinstance(v, int) else -1


def server_info(state: ServerState) -> pb.GetServerInfoResponse:
    info = state.engine.info
    assert info is not None
    args = struct_pb2.Struct()
    args.update({"model_path": info.model_path, "served_model_name": state.model_name,
                 "page_size": info.page_size, "context_length": info.max_model_len,
                 "max_running_requests": state.max_running_requests,
                 "num_speculative_tokens": info.num_speculative_tokens, "overlap": info.overlap,
                 "device": info.device, "dtype": info.dtype, "tool_call_parser": state.tool_parser,
                 "reasoning_parser": state.reasoning_parser or ""})
    sched = struct_pb2.Struct()
    sched.update({"kv_pages_total": state.engine.stats.kv_pages_total, "page_size": info.page_size,
                  "kv_bytes_per_token": info.kv_bytes_per_token})
    started = state.engine.started_at
    ts = timestamp_pb2.Timestamp()
    ts.FromSeconds(int(started))
    _, total, _ = _usage(state)
    return pb.GetServerInfoResponse(
        server_args=args, scheduler_info=sched, active_requests=state.engine.num_live_requests,
        is_paused=False, uptime_seconds=time.time() - started, max_total_num_tokens=total,
        tokenspeed_version=f"agentspeed {__version__}", start_time=ts, constrained_decoding="requested")


def as_json(msg: Any) -> dict[str, Any]:
    """A report message as the HTTP routes return it (proto field names, defaults included)."""
    out: dict[str, Any] = json.loads(json_format.MessageToJson(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
    return out
