"""Scale-out: `agentspeed launch` with 2 replicas (1 core each, the default model) behind the
real Shepherd Model Gateway from PyPI (tokenspeed-smg), over gRPC, driven by the official
openai client. The replicas' own HTTP ports are the direct `agentspeed serve` to compare with."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentspeed.launch import free_port

MODEL = "SmolLM2-135M-Instruct"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


class Cluster:
    def __init__(self) -> None:
        self.port = free_port()
        base = free_port()
        while base + 3 > 65535:
            base = free_port()
        self.replica_ports = [base, base + 2]
        self.log_path = f"/tmp/agentspeed-test-launch-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentspeed.cli", "launch", "--replicas", "2", "--port", str(self.port),
             "--replica-port-base", str(base), "--kv-cache-memory", "256MiB", "--log-level", "info",
             "--smg-args", "--reasoning-parser qwen3 --tool-call-parser qwen"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while "[launch] ready" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the cluster did not start:\n{self.log()[-5000:]}")
            time.sleep(0.5)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def worker_url(self, i: int) -> str:
        return f"grpc://127.0.0.1:{self.replica_ports[i] + 1}"

    def replica_pid(self, i: int) -> int:
        return int(re.findall(rf"\[launch\] replica {i}: .*\(pid (\d+)\)", self.log())[-1])

    def smg_metric(self, name: str, **labels: str) -> float:
        port = re.findall(r"metrics http://127.0.0.1:(\d+)/metrics", self.log())[-1]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    pids = [c.replica_pid(i) for i in range(2)]
    assert c.stop() == 0, c.log()[-5000:]
    assert "[launch] stopped" in c.log()
    for pid in pids:  # every replica is gone after the launcher exits
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text().lower()


def _chat(client: openai.OpenAI, messages: list[dict[str, str]], **kw: object) -> tuple[object, str | None]:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, temperature=0,
                                                           **kw)  # type: ignore[call-overload]
    return raw.parse(), raw.headers.get("x-smg-routed-worker-id")


def test_chat_through_the_gateway_equals_direct(cluster: Cluster) -> None:
    msgs = [{"role": "user", "content": "Name three colors."}]
    via, worker = _chat(cluster.client, msgs, max_tokens=40)
    assert worker in (cluster.worker_url(0), cluster.worker_url(1))
    for port in cluster.replica_ports:
        direct = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        d = direct.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40)  # type: ignore[arg-type]
        assert d.choices[0].message.content == via.choices[0].message.content  # type: ignore[attr-defined]
        assert d.choices[0].finish_reason == via.choices[0].finish_reason  # type: ignore[attr-defined]
        assert d.usage is not None and d.usage.completion_tokens == via.usage.completion_tokens  # type: ignore[attr-defined]
    stream = cluster.client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40,  # type: ignore[arg-type]
                                                    stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        parts += [c.delta.content or "" for c in chunk.choices]
    assert "".join(parts) == via.choices[0].message.content  # type: ignore[attr-defined]
    assert usage is not None and usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens


def test_gateway_parses_tool_calls_and_reasoning(cluster: Cluster) -> None:
    # The engine's output is held to a shape by a regex (a constraint the gateway forwards);
    # what turns it into a tool call or a reasoning field is the gateway's parser.
    call = '<tool_call>\n\\{"name": "get_weather", "arguments": \\{"city": "Paris"\\}\\}\n</tool_call>'
    r, _ = _chat(cluster.client, [{"role": "user", "content": "Weather in Paris?"}], tools=WEATHER, max_tokens=60,
                 extra_body={"regex": call})
    [tc] = r.choices[0].message.tool_calls  # type: ignore[attr-defined]
    assert tc.function.name == "get_weather" and tc.function.arguments.replace(" ", "") == '{"city":"Paris"}'
    assert r.choices[0].finish_reason == "tool_calls"  # type: ignore[attr-defined]
    r, _ = _chat(cluster.client, [{"role": "user", "content": "hi"}], max_tokens=40,
                 extra_body={"regex": "<think>[a-z ]{3,20}</think>Hello!"})
    msg = r.choices[0].message  # type: ignore[attr-defined]
    assert msg.content == "Hello!" and getattr(msg, "reasoning_content", None)
    # a forced call: the gateway builds the constraint from the tool's schema
    r, _ = _chat(cluster.client, [{"role": "user", "content": "Weather in Rome?"}], tools=WEATHER, max_tokens=60,
                 tool_choice="required")
    [tc] = r.choices[0].message.tool_calls  # type: ignore[attr-defined]
    assert tc.function.name == "get_weather" and "city" in tc.function.arguments


def test_sessions_stay_on_a_replica_and_hit_its_cache(cluster: Cluster) -> None:
    before = cluster.smg_metric("smg_cache_aware_policy_branch_total", branch="event_hit")
    for s in range(3):
        msgs = [{"role": "system", "content": f"You are assistant number {s}. " * 20}]
        workers = []
        for turn in range(3):
            msgs.append({"role": "user", "content": f"Turn {turn}: a fact about the number {turn + s}."})
            r, w = _chat(cluster.client, msgs, max_tokens=16, extra_headers={"X-SMG-Routing-Key": f"session-{s}"})
            workers.append(w)
            cached = r.usage.prompt_tokens_details.cached_tokens  # type: ignore[attr-defined]
            if turn:
                assert cached >= r.usage.prompt_tokens - 64, (s, turn, cached)  # type: ignore[attr-defined]
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})  # type: ignore[attr-defined]
        assert len(set(workers)) == 1, workers
    # the routing used the replicas' KV events (not only the gateway's own guesses)
    assert cluster.smg_metric("smg_kv_event_blocks_total", op="stored") > 0
    assert cluster.smg_metric("smg_cache_aware_policy_branch_total", branch="event_hit") > before
    loads = httpx.get(f"{cluster.url}/loads").json()["loads"]
    assert sorted(x["worker"] for x in loads) == sorted(cluster.worker_url(i) for i in range(2))
    assert all(x["max_total_num_tokens"] > 0 for x in loads)


def test_a_killed_replica_fails_fast_and_comes_back(cluster: Cluster) -> None:
    # A long stream, to learn which replica serves it; then kill -9 that replica.
    msgs = [{"role": "user", "content": "Write a very long story about the sea."}]
    raw = cluster.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs, temperature=0, max_tokens=3000, stream=True,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True})
    victim = [cluster.worker_url(i) for i in range(2)].index(raw.headers["x-smg-routed-worker-id"])
    stream = raw.parse()
    next(iter(stream))
    pid = cluster.replica_pid(victim)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    failed = threading.Event()

    def drain() -> None:
        try:
            for _ in stream:
                pass
        except Exception:
            pass
        failed.set()

    threading.Thread(target=drain, daemon=True).start()
    assert failed.wait(30), "the in-flight request hung after its replica died"
    assert time.monotonic() - t0 < 30
    # new requests succeed on the other replica meanwhile
    survivor = cluster.worker_url(1 - victim)
    for i in range(4):
        r, w = _chat(cluster.client, [{"role": "user", "content": f"hello {i}"}], max_tokens=4)
        assert w == survivor and r.choices[0].message.content  # type: ignore[attr-defined]
    # the launcher restarts it and the gateway takes it back
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if cluster.replica_pid(victim) != pid and _worker_healthy(cluster, cluster.worker_url(victim)):
            try:
                if httpx.get(f"http://127.0.0.1:{cluster.replica_ports[victim]}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(1)
    else:
        pytest.fail(f"replica {victim} did not come back:\n{cluster.log()[-4000:]}")
    assert f"replica {victim} exited (code -9); restarting" in cluster.log()
    # ...and routes to it again by its KV events: a long prompt cached only there (sent to
    # the replica directly) goes there through the gateway
    msgs = [{"role": "user", "content": "A prompt only the revived replica has seen. " * 30}]
    direct = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.replica_ports[victim]}/v1", api_key="x")
    direct.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=2)  # type: ignore[arg-type]
    time.sleep(1.0)  # the events reach the gateway within a step; its index applies them
    r, w = _chat(cluster.client, msgs, max_tokens=2)
    assert w == cluster.worker_url(victim)
    assert r.usage.prompt_tokens_details.cached_tokens >= 256  # type: ignore[attr-defined]


def _worker_healthy(cluster: Cluster, url: str) -> bool:
    try:
        workers = httpx.get(f"{cluster.url}/workers").json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return any(w["url"] == url and w.get("is_healthy") for w in workers)


def test_bench_sends_text_through_the_gateway(cluster: Cluster, tmp_path: Path) -> None:
    from test_bench import _write_trie

    trace = _write_trie(tmp_path / "t.jsonl")
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "agentspeed.cli", "bench", "--endpoint", f"smg={cluster.url}", "--workload",
           str(trace), "--scale", "1", "--concurrency", "2", "--num-sessions", "2", "--prompt-format", "text",
           "--output", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    [row] = json.loads(out.read_text())["results"]
    assert row["errors"] == 0 and row["requests"] == 5
    per = row["per_replica"]
    assert set(per) <= {cluster.worker_url(0), cluster.worker_url(1)} and per
    assert sum(x["requests"] for x in per.values()) == 5
    assert row["eligible_hit_rate"] > 0.5, row  # re-tokenised text: boundaries may differ
    assert "eligible hit rate" in r.stderr
