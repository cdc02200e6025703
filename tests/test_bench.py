"""`agentspeed bench`: workload loading for the three trace formats, and a short closed-loop
replay against a real server (tiny model) that checks the report's figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from server_util import ServerProcess

from agentspeed.bench.workloads import load_sessions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "workloads"
TRIE = SHARED / "trie" / "agentic_coding_8k.jsonl"
MOONCAKE_SESSIONS = SHARED / "agent_traj" / "derived" / "mini_swe_agent_deepseek_sessions.jsonl"
TRAJ_DIR = SHARED / "agent_traj" / "mini-swe-agent-pr816"

needs_traces = pytest.mark.skipif(not TRIE.exists(), reason="../shared/workloads is not beside the repository")


def _write_trie(path: Path) -> Path:
    rows = [{"input_prompt_length": 600, "assistant_response_length": [40, 30, 50], "num_turns": 3,
             "tool_call_latency": [0.5, 0.2, 0.1], "tool_call_output_length": [200, 100, 0],
             "final_assistant_response_length": 50},
            {"input_prompt_length": 900, "assistant_response_length": [20, 60], "num_turns": 2,
             "tool_call_latency": [1.0, 0.0], "tool_call_output_length": [300, 0],
             "final_assistant_response_length": 60}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trie_sessions_scale_and_cap(tmp_path: Path) -> None:
    f = _write_trie(tmp_path / "t.jsonl")
    [a, b] = load_sessions(f, scale=2, max_context=10_000)
    assert [t.output_tokens for t in b.turns] == [10, 30]
    assert [t.output_tokens for t in a.turns] == [20, 15, 25]
    assert [len(t.new_tokens or []) for t in a.turns] == [300, 100, 50]
    assert a.turns[0].delay_s == 0.5 and a.kind == "tokens"
    # Context cap: turn 2 would need 300 + 20 + 100 + 15 = 435 tokens.
    [a] = load_sessions(f, scale=2, max_context=400, num_sessions=1)
    assert len(a.turns) == 1
    # Same seed, same tokens; other seed, other tokens.
    assert load_sessions(f, 2)[0].turns[0].new_tokens == a.turns[0].new_tokens
    assert load_sessions(f, 2, seed=1)[0].turns[0].new_tokens != a.turns[0].new_tokens


@needs_traces
def test_real_trace_formats() -> None:
    trie = load_sessions(TRIE, scale=16, max_context=8192, num_sessions=3)
    assert len(trie) == 3 and all(s.kind == "tokens" for s in trie)
    moon = load_sessions(MOONCAKE_SESSIONS, scale=16, max_context=4096, num_sessions=2)
    s = moon[0]
    assert len(s.turns) > 5
    # Consecutive turns of an agent session share their leading blocks (same hashes, same ids).
    p0, p1 = s.turns[0].prompt_tokens or [], s.turns[1].prompt_tokens or []
    assert len(p0) >= 32 and p1[: len(p0) // 32 * 32] == p0[: len(p0) // 32 * 32]
    traj = load_sessions(TRAJ_DIR, scale=16, max_context=8192, num_sessions=2, max_turns=5)
    t = traj[0]
    assert t.kind == "chat" and 1 <= len(t.turns) <= 5
    assert t.turns[1].messages[: len(t.turns[0].messages)] == t.turns[0].messages  # append-only
    assert {m["role"] for m in t.turns[-1].messages} <= {"system", "user", "assistant"}


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> ServerProcess:
    from conftest import make_tiny
    from transformers import AutoTokenizer

    path = make_tiny("llama", tmp_path_factory.mktemp("bench_model"), vocab_size=49152, max_position_embeddings=4096)
    AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name).save_pretrained(path)
    srv = ServerProcess([str(path), "--kv-cache-memory", "64MiB"])
    yield srv
    srv.stop()


def test_replay_against_server(tiny_server: ServerProcess, tmp_path: Path) -> None:
    trace = _write_trie(tmp_path / "t.jsonl")
    out, plot = tmp_path / "r.json", tmp_path / "p.png"
    cmd = [sys.executable, "-m", "agentspeed.cli", "bench", "--endpoint", f"ours={tiny_server.url}",
           "--workload", str(trace), "--scale", "1", "--concurrency", "1,2", "--num-sessions", "2",
           "--output", str(out), "--plot", str(plot)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    rows = json.loads(out.read_text())["results"]
    assert [x["concurrency"] for x in rows] == [1, 2]
    for x in rows:
        assert x["errors"] == 0 and x["requests"] == 5
        assert x["completion_tokens"] == 40 + 30 + 50 + 20 + 60  # ignore_eos: lengths follow the trace
        # Every turn re-sends the previous prompt + the generated ids: all full pages hit.
        assert x["eligible_hit_rate"] > 0.9, x
        assert x["per_user_decode_tok_s_p50"] > 0 and x["ttft_s_p50"] > 0 and x["tok_min_per_device"] > 0
        # Only the session's own previous turn can hit: levels and sessions share no content
        # (a first turn has nothing eligible, so a hit there would push cached above eligible).
        assert x["cached_tokens"] <= x["eligible_tokens"]
    assert plot.stat().st_size > 1000
    assert "agentic replay" in r.stdout
