"""The gRPC worker (`agentspeed serve --grpc-port`), driven with the TokenSpeedScheduler
stubs of PyPI tokenspeed-smg-grpc-proto, against a real server process with the default
model; results compared with the same server's HTTP API."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_util import ServerProcess
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import tokenspeed_scheduler_pb2 as pb
from smg_grpc_proto.generated import tokenspeed_scheduler_pb2_grpc as pb_grpc

from agentspeed.launch import free_port

MODEL = "SmolLM2-135M-Instruct"


class Worker:
    def __init__(self) -> None:
        self.grpc_port = free_port()
        self.http = ServerProcess(["--grpc-port", str(self.grpc_port), "--page-size", "16"])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.stub = pb_grpc.TokenSpeedSchedulerStub(self.channel)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.channel.close()
    assert w.http.stop() == 0, w.http.log()


def _prompt(worker: Worker, text: str) -> list[int]:
    r = httpx.post(f"{worker.http.url}/tokenize", json={"messages": [{"role": "user", "content": text}]})
    return list(r.json()["tokens"])


def _request(ids: list[int], stream: bool = False, rid: str = "", **sp: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, tokenized=pb.TokenizedInput(input_ids=ids), stream=stream,
                              sampling_params=pb.SamplingParams(**sp))  # type: ignore[arg-type]


def _generate(worker: Worker, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return list(worker.stub.Generate(req, timeout=120))


def test_generate_equals_http_completion(worker: Worker) -> None:
    ids = _prompt(worker, "Name three colors.")
    http = httpx.post(f"{worker.http.url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": ids, "max_tokens": 24, "temperature": 0, "return_token_ids": True}).json()
    want = http["choices"][0]["token_ids"]
    [done] = _generate(worker, _request(ids, temperature=0.0, max_new_tokens=24))
    c = done.complete
    assert done.WhichOneof("response") == "complete"
    got = list(c.output_ids) + ([c.matched_token_id] if c.HasField("matched_token_id") else [])
    assert got == want
    assert c.finish_reason == http["choices"][0]["finish_reason"]
    assert c.prompt_tokens == len(ids) and c.completion_tokens == len(want)
    # streamed: chunks concatenate to the same ids, and a Complete ends the stream
    resps = _generate(worker, _request(ids, stream=True, temperature=0.0, max_new_tokens=24))
    assert [r.WhichOneof("response") for r in resps][-1] == "complete"
    streamed = [t for r in resps if r.WhichOneof("response") == "chunk" for t in r.chunk.token_ids]
    assert streamed == list(c.output_ids)
    assert resps[-1].complete.cached_tokens >= 16  # the same prompt again: a prefix-cache hit


def test_stop_token_trim_logprobs_n_and_seed(worker: Worker) -> None:
    ids = _prompt(worker, "Say hello.")
    # Outputs are compared across requests below, so each takes the same path: the prompt's
    # full pages from the prefix cache. A full prefill rounds differently, and this prompt's
    # second greedy token is a near-tie (SmolLM2 Q4_1: 665 and 17 within 1e-3 in logprob).
    _generate(worker, _request(ids, temperature=0.0, max_new_tokens=1))
    [r] = _generate(worker, _request(ids, temperature=0.0, max_new_tokens=64))
    assert r.complete.finish_reason == "stop" and r.complete.matched_token_id == 2  # EOS, left out
    assert 2 not in r.complete.output_ids
    [k] = _generate(worker, _request(ids, temperature=0.0, max_new_tokens=64, no_stop_trim=True))
    assert list(k.complete.output_ids) == [*r.complete.output_ids, 2]
    assert k.complete.cached_tokens == r.complete.cached_tokens > 0
    req = _request(ids, temperature=0.0, max_new_tokens=8, ignore_eos=True)
    req.return_logprob, req.top_logprobs_num = True, 3
    [lp] = _generate(worker, req)
    out = lp.complete.output_logprobs
    assert list(out.token_ids) == list(lp.complete.output_ids) and len(out.token_logprobs) == 8
    assert all(len(t.values) == 3 and t.token_ids[0] == tok for t, tok in zip(out.top_logprobs, out.token_ids))
    two = _generate(worker, _request(ids, temperature=1.0, max_new_tokens=12, n=2, sampling_seed=7, ignore_eos=True))
    again = _generate(worker, _request(ids, temperature=1.0, max_new_tokens=12, n=2, sampling_seed=7, ignore_eos=True))
    assert sorted(r.complete.index for r in two) == [0, 1]
    assert {r.complete.index: list(r.complete.output_ids) for r in two} == \
        {r.complete.index: list(r.complete.output_ids) for r in again}
    [m] = _generate(worker, _request(ids, temperature=0.0, max_new_tokens=64, min_new_tokens=20))
    assert m.complete.completion_tokens >= 20


def test_constraint_goes_through_the_grammar(worker: Worker) -> None:
    ids = _prompt(worker, "Pick a number.")
    [r] = _generate(worker, _request(ids, temperature=0.0, max_new_tokens=16, regex="[0-9]{3}"))
    text = httpx.post(f"{worker.http.url}/detokenize", json={"tokens": list(r.complete.output_ids)}).json()["prompt"]
    assert len(text) == 3 and text.isdigit(), text
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    [j] = _generate(worker, _request(ids, temperature=0.0, max_new_tokens=32, json_schema=schema))
    obj = json.loads(httpx.post(f"{worker.http.url}/detokenize", json={"tokens": list(j.complete.output_ids)}
                                ).json()["prompt"])
    assert isinstance(obj["n"], int)
    # a structural tag (how SMG forces a tool-call format): the tagged region follows the schema
    tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool_call>"],
           "at_least_one": True, "stop_after_first": True, "tags": [{"begin": "<tool_call>\n", "end": "\n</tool_call>",
           "content": {"type": "json_schema", "json_schema": json.loads(schema)}}]}}
    [t] = _generate(worker, _request(ids, temperature=0.0, max_new_tokens=48, structural_tag=json.dumps(tag)))
    out = httpx.post(f"{worker.http.url}/detokenize", json={"tokens": list(t.complete.output_ids)}).json()["prompt"]
    body = out.split("<tool_call>\n", 1)[1].split("\n</tool_call>", 1)[0]
    assert isinstance(json.loads(body)["n"], int), out


@pytest.mark.parametrize(("kw", "needle"), [
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"structural_tag": "{not json"}, "structural_tag"),
    ({"json_schema": "{not json"}, "json"),
    ({"max_new_tokens": 100000}, "context length"),
])
def test_invalid_requests_are_invalid_argument(worker: Worker, kw: dict[str, object], needle: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _generate(worker, _request(_prompt(worker, "hi"), **kw))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (e.value.details() or "").lower(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _generate(worker, _request([]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _running(worker: Worker) -> int:
    return int(worker.stub.GetLoads(pb.GetLoadsRequest()).loads[0].num_running_reqs)


def _wait_idle(worker: Worker) -> None:
    deadline = time.monotonic() + 30
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(worker) == 0


def test_abort_and_cancel_free_the_request(worker: Worker) -> None:
    ids = _prompt(worker, "Write a long story.")
    stream = worker.stub.Generate(_request(ids, stream=True, rid="victim", max_new_tokens=2000, ignore_eos=True))
    first = next(stream)
    assert first.chunk is not None
    assert worker.stub.Abort(pb.AbortRequest(request_id="victim")).success
    with pytest.raises(grpc.RpcError) as e:
        for _ in stream:
            pass
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert not worker.stub.Abort(pb.AbortRequest(request_id="victim")).success  # no longer live
    _wait_idle(worker)
    # a cancelled stream (the gateway gone) aborts its request too
    stream = worker.stub.Generate(_request(ids, stream=True, rid="gone", max_new_tokens=2000, ignore_eos=True))
    next(stream)
    assert _running(worker) == 1
    stream.cancel()
    _wait_idle(worker)


def test_reports_and_health(worker: Worker) -> None:
    info = worker.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.served_model_name == MODEL and info.architectures == ["LlamaForCausalLM"]
    assert info.max_context_length == 8192 and info.vocab_size == 49152 and list(info.eos_token_ids) == [2]
    assert info.tokenizer_path == ""  # a GGUF: the gateway fetches the tokenizer instead
    srv = worker.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert srv.max_total_num_tokens > 0 and srv.server_args["page_size"] == 16
    loads = worker.stub.GetLoads(pb.GetLoadsRequest())
    assert loads.dp_rank_count == 1 and loads.loads[0].max_total_num_tokens == srv.max_total_num_tokens
    http = httpx.get(f"{worker.http.url}/v1/loads").json()
    assert http["loads"][0]["max_total_num_tokens"] == srv.max_total_num_tokens
    assert set(http["loads"][0]) >= {"num_running_reqs", "num_waiting_reqs", "token_usage", "max_running_requests"}
    assert httpx.get(f"{worker.http.url}/model_info").json()["served_model_name"] == MODEL
    assert httpx.get(f"{worker.http.url}/server_info").json()["max_total_num_tokens"] == srv.max_total_num_tokens
    assert worker.stub.HealthCheck(pb.HealthCheckRequest()).healthy
    hs = health_pb2_grpc.HealthStub(worker.channel)
    for name in ("", "tokenspeed.grpc.scheduler.TokenSpeedScheduler"):
        assert hs.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING


def test_tokenizer_bundle(worker: Worker) -> None:
    chunks = list(worker.stub.GetTokenizer(common_pb2.GetTokenizerRequest()))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest() and all(not c.sha256 for c in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = set(z.namelist())
        assert {"tokenizer.json", "tokenizer_config.json"} <= names
        # the chat template rides along (newer transformers write it as its own file)
        assert "chat_template.jinja" in names or "chat_template" in json.loads(z.read("tokenizer_config.json"))


def test_kv_events_follow_the_prefix_cache(worker: Worker) -> None:
    got: list[common_pb2.KvEventBatch] = []
    sub = worker.stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(load_records_before_first_batch=True))

    def read() -> None:
        try:
            for b in sub:
                got.append(b)
        except grpc.RpcError:
            pass

    t = threading.Thread(target=read, daemon=True)
    t.start()
    ids = _prompt(worker, "A fresh prompt for the event stream: " + "tell me about owls " * 6)
    _generate(worker, _request(ids, temperature=0.0, max_new_tokens=4, ignore_eos=True))
    flushed = worker.stub.FlushCache(common_pb2.FlushCacheRequest(timeout_s=30))
    assert flushed.success, flushed.message

    def events(kind: str) -> list[Any]:
        return [getattr(e, kind) for b in list(got) for e in b.events if e.WhichOneof("data") == kind]

    deadline = time.monotonic() + 20  # (a loaded machine: the flush's events come a step later)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        stored_hashes = {b.block_hash for s in events("stored") for b in s.blocks}
        if stored_hashes and stored_hashes <= {h for r in events("removed") for h in r.block_hashes}:
            break
    time.sleep(1.0)  # two heartbeats at least
    sub.cancel()
    t.join(5)
    assert got and got[0].load.load_only and got[0].sequence_number == 0  # load record first
    stored = events("stored")
    removed = {h for r in events("removed") for h in r.block_hashes}
    # this prompt's full pages: following parent hashes back from its last full page gives
    # exactly its tokens (earlier pages may have been stored by an earlier request)
    parent: dict[int, int | None] = {}
    tokens: dict[int, list[int]] = {}
    for st in stored:
        prev = st.parent_block_hash if st.HasField("parent_block_hash") else None
        for b in st.blocks:
            assert b.block_size == 16 and len(b.token_ids) == 16
            parent[b.block_hash], tokens[b.block_hash], prev = prev, list(b.token_ids), b.block_hash
    n_full = len(ids) // 16
    assert n_full >= 3
    [last] = [h for h, t in tokens.items() if t == ids[(n_full - 1) * 16 : n_full * 16]]
    chain: list[int] = []
    h: int | None = last
    while h is not None:
        chain = tokens[h] + chain
        h = parent[h]
    assert chain == ids[: n_full * 16]
    blocks = [b for s in stored for b in s.blocks]
    assert {b.block_hash for b in blocks} <= removed  # the flush evicted all of them
    heartbeats = [b for b in got if b.load.load_only]
    assert len(heartbeats) >= 2  # idle: the load record still arrives every 0.5 s
    seqs = [b.sequence_number for b in got if not b.load.load_only]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_smg_over_http_reads_our_loads(worker: Worker) -> None:
    # The HTTP worker path: SMG's least_load policy polls GET /v1/loads.
    port, metrics = free_port(), free_port()
    log = open(f"/tmp/agentspeed-test-smg-http-{port}.log", "w")  # noqa: SIM115
    smg = subprocess.Popen([sys.executable, "-m", "smg", "launch", "--host", "127.0.0.1", "--port", str(port),
                            "--worker-urls", worker.http.url, "--policy", "least_load", "--prometheus-port",
                            str(metrics), "--load-monitor-interval", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                loads = httpx.get(f"{url}/loads", timeout=2).json().get("loads") or []
                if loads and loads[0].get("max_total_num_tokens"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline and smg.poll() is None, Path(log.name).read_text()[-3000:]
            time.sleep(0.5)
        ours = httpx.get(f"{worker.http.url}/v1/loads").json()["loads"][0]
        assert loads[0]["worker"] == worker.http.url
        assert loads[0]["max_total_num_tokens"] == ours["max_total_num_tokens"]
        assert loads[0]["max_running_requests"] == ours["max_running_requests"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
        assert r.choices[0].message.content
    finally:
        smg.send_signal(signal.SIGTERM)
        try:
            smg.wait(30)
        except subprocess.TimeoutExpired:
            smg.kill()
        log.close()
