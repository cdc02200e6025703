"""Agent sessions for closed-loop replay, from the three trace formats.

A Session is a list of Turns. Each turn sends the session's conversation so far plus what is
new in that turn, asks for exactly `output_tokens` tokens (EOS ignored), and the next turn
starts `delay_s` after the response ends (the agent's tool time). Two kinds of prompt:

- token ids (trie, Mooncake): sent to /v1/completions, so block boundaries cannot drift in
  re-tokenisation. Turn t+1's prompt is turn t's prompt + the tokens turn t *generated* +
  the new tokens, as an agent re-sends it (trie). Mooncake prompts come from `hash_ids`: block
  h is `block_size` token ids drawn from a PRNG seeded by h, so equal hashes are equal text.
- messages (agent_traj): the recorded conversation of a real coding agent, sent to
  /v1/chat/completions turn by turn; its text is real code and shell output.

Scaling: token lengths are divided by `scale` (min 1); message text is cut to 1/scale of its
characters. A session stops at the first turn whose prompt + output would exceed
`max_context` tokens (a message turn's size is estimated as the recorded provider prompt
tokens / scale).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VOCAB_LO, VOCAB_HI = 100, 49000  # ordinary vocabulary ids of SmolLM2-class tokenizers


@dataclass(slots=True)
class Turn:
    output_tokens: int
    delay_s: float = 0.0  # tool time after this turn's response, before the next turn
    new_tokens: list[int] | None = None  # token workloads: appended after the previous answer
    prompt_tokens: list[int] | None = None  # Mooncake: the whole prompt (not appended)
    messages: list[dict[str, Any]] | None = None  # message workloads: the whole conversation


@dataclass(slots=True)
class Session:
    session_id: str
    turns: list[Turn] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "chat" if self.turns and self.turns[0].messages is not None else "tokens"


def scaled(n: float, scale: float) -> int:
    return max(1, round(n / scale))


def _draw(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)]


def detect_format(path: Path) -> str:
    if path.is_dir() or path.name.endswith(".traj.json") or path.suffix == ".traj":
        return "agent_traj"
    with path.open() as f:
        first = json.loads(f.readline())
    if "input_prompt_length" in first:
        return "trie"
    if "hash_ids" in first:
        return "mooncake"
    raise ValueError(f"{path}: not a trie, Mooncake or agent trajectory file")


def load_sessions(path: str | Path, scale: float = 1.0, max_context: int = 8192, num_sessions: int | None = None,
                  seed: int = 0, max_turns: int | None = None) -> list[Session]:
    """Sessions from a trie / Mooncake (.jsonl) file, or agent trajectories (a .traj.json
    file or a directory of them); raises ValueError for anything else."""
    p = Path(path)
    fmt = detect_format(p)
    gen = {"trie": _trie, "mooncake": _mooncake, "agent_traj": _agent_traj}[fmt]
    out: list[Session] = []
    for s in gen(p, scale, max_context, seed):
        if max_turns is not None:
            s.turns = s.turns[:max_turns]
        if s.turns:
            out.append(s)
        if num_sessions is not None and len(out) >= num_sessions:
            break
    if not out:
        raise ValueError(f"{path}: no session fits max_context={max_context} at scale {scale}")
    return out


def _trie(path: Path, scale: float, max_context: int, seed: int) -> Iterator[Session]:
    with path.open() as f:
        for i, line in enumerate(f):
            t = json.loads(line)
            rng = random.Random(seed * 1_000_003 + i)
            prompt = scaled(t["input_prompt_length"], scale)
            ctx = prompt
            s = Session(f"trie-{i}")
            outs, tools = t["assistant_response_length"], t["tool_call_output_length"]
            lat = t.get("tool_call_latency", [0.0] * len(outs))
            for k, out_len in enumerate(outs):
                new = prompt if k == 0 else scaled(tools[k - 1], scale)
                out = scaled(out_len, scale)
                if ctx + (0 if k == 0 else new) + out > max_context:
                    break
                if k:
                    ctx += new
                s.turns.append(Turn(out, float(lat[k]) if k < len(lat) else 0.0, new_tokens=_draw(rng, new)))
                ctx += out
            yield s


def _mooncake(path: Path, scale: float, max_context: int, seed: int) -> Iterator[Session]:
    """Sessions by `session_id` (derived traces) in file order; a trace without sessions gives
    one single-turn session per request. Tool delay: the recorded `delay_ms`, else 0."""
    sessions: dict[str, Session] = {}
    order: list[str] = []
    dead: set[str] = set()
    with path.open() as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            sid = str(r.get("session_id", f"req-{i}"))
            if sid in dead:
                continue
            block = max(1, round(r.get("block_size", 512) / scale))
            n_in = scaled(r["input_length"], scale)
            out = scaled(r["output_length"], scale)
            if n_in + out > max_context:
                dead.add(sid)
                continue
            toks: list[int] = []
            for h in r["hash_ids"]:
                toks += _draw(random.Random(seed * 1_000_003 + int(h)), block)
            toks = toks[:n_in] + _draw(random.Random(f"{seed}-{i}"), max(0, n_in - len(toks)))
            if sid not in sessions:
                sessions[sid] = Session(f"mooncake-{sid}")
                order.append(sid)
            s = sessions[sid]
            if s.turns:
                s.turns[-1].delay_s = float(r.get("delay_ms", 0)) / 1000
            s.turns.append(Turn(out, prompt_tokens=toks))
    for sid in order:
        yield sessions[sid]


def _flatten(m: dict[str, Any], scale: float) -> dict[str, Any] | None:
    """A recorded message as plain text any chat endpoint accepts (tool calls written into the
    assistant text, tool results as user messages), cut to 1/scale of its characters."""
    role = m.get("role")
    if role not in ("system", "user", "assistant", "tool"):
        return None
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    text = str(content or "")
    for c in m.get("tool_calls") or []:
        fn = c.get("function", {})
        text += f"\n<tool_call>{json.dumps({'name': fn.get('name'), 'arguments': fn.get('arguments')})}</tool_call>"
    if scale > 1:
        text = text[: max(1, int(len(text) / scale))]
    return {"role": "user" if role == "tool" else role, "content": text}


def _agent_traj(path: Path, scale: float, max_context: int, seed: int) -> Iterator[Session]:
    files = sorted(path.rglob("*.traj.json")) + sorted(path.rglob("*.traj")) if path.is_dir() else [path]
    for file in files:
        data = json.loads(file.read_text())
        messages = data.get("messages") or data.get("history") or []
        s = Session(f"traj-{data.get('instance_id', file.stem)}")
        convo: list[dict[str, Any]] = []
        last_ts: float | None = None
        for m in messages:
            extra = m.get("extra") or {}
            if m.get("role") == "assistant":
                usage = (extra.get("response") or {}).get("usage") or {}
                n_prompt = usage.get("prompt_tokens")
                n_out = usage.get("completion_tokens") or 64
                if n_prompt is not None and scaled(n_prompt, scale) + scaled(n_out, scale) > max_context:
                    break
                if convo:
                    s.turns.append(Turn(scaled(n_out, scale), messages=list(convo)))
                last_ts = extra.get("timestamp")
            elif m.get("role") == "tool" and s.turns and last_ts and extra.get("timestamp"):
                s.turns[-1].delay_s = max(0.0, float(extra["timestamp"]) - float(last_ts))
            flat = _flatten(m, scale)
            if flat is not None:
                convo.append(flat)
        yield s


def last_turn_prompts(path: str | Path, tokenizer: Any, num_sessions: int, prompt_tokens: int) -> list[list[int]]:
    """Real agent prompts for offline checks: each session's last recorded turn, rendered with
    the chat template (tokenizer.apply_chat_template), its last prompt_tokens tokens."""
    sessions = load_sessions(path, scale=1, max_context=2 * prompt_tokens, num_sessions=num_sessions, max_turns=6)
    return [tokenizer.apply_chat_template(s.turns[-1].messages or [])[-prompt_tokens:] for s in sessions]
