"""Frontend pieces without a server: incremental detokenization with stop strings, tool-call
parsers, and the engine <-> frontend message encoding."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentspeed.control.fsm import FinishReason
from agentspeed.control.plan import RequestSpec, RequestUpdate, TokenLogprob
from agentspeed.engine.detokenizer import IncrementalDetokenizer
from agentspeed.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineInput,
    EngineOutput,
    EngineOutputs,
    EngineStats,
)
from agentspeed.sampling_params import SamplingParams


class ByteTokenizer:
    """Token i is byte i; text is UTF-8 decoded with replacement (like a byte-level BPE)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _run(text: str, stop: Sequence[str], chunks: Sequence[int], include: bool = False) -> tuple[list[str], IncrementalDetokenizer]:
    ids = list(text.encode())
    d = IncrementalDetokenizer(ByteTokenizer(), [], stop, include_stop_str_in_output=include)
    out, i, k = [], 0, 0
    while i < len(ids) and not d.stopped:
        n = chunks[k % len(chunks)]
        k += 1
        out.append(d.update(ids[i : i + n], i + n >= len(ids)))
        i += n
    return out, d


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab é€\n", max_size=40), st.lists(st.sampled_from(["ab", "é€", "\n\n", "b a"]), max_size=2),
       st.lists(st.integers(1, 4), min_size=1, max_size=5), st.booleans())
def test_deltas_concatenate_to_text_and_stop_is_exact(text: str, stop: list[str], chunks: list[int],
                                                      include: bool) -> None:
    deltas, d = _run(text, stop, chunks, include)
    assert "".join(deltas) == d.text
    hits = [(text.find(s), s) for s in stop if s in text]
    if hits:
        i, s = min(hits)
        assert d.stop_reason is not None
        assert d.text == (text[: i + len(s)] if include else text[:i])
    else:
        assert d.text == text and d.stop_reason is None
    assert "\ufffd" not in "".join(deltas)


def test_partial_stop_string_is_held_back() -> None:
    d = IncrementalDetokenizer(ByteTokenizer(), [], ["STOP"])
    assert d.update(list(b"hello ST"), False) == "hello"
    assert d.update(list(b"AY"), False) == " S"  # the last 3 characters are always held
    assert d.update(list(b" ok"), True) == "TAY ok"  # finished: everything goes out
    assert d.text == "hello STAY ok" and d.stop_reason is None


def test_messages_round_trip_msgpack() -> None:
    spec = RequestSpec("r1", (1, 2, 3), 8, 0, frozenset({2}), 0, "sess", None,
                       params=SamplingParams(temperature=0.5, stop=["x"]))
    msgs: list[EngineInput] = [AddRequest(spec), AbortRequests(["r1"])]
    dec = msgspec.msgpack.Decoder(EngineInput)
    assert [dec.decode(msgspec.msgpack.encode(m)) for m in msgs] == msgs
    out = EngineOutputs([RequestUpdate("r1", (5,), FinishReason.STOP, 16, "", (TokenLogprob(5, -0.5, ((5, -0.5),)),))],
                        EngineStats(1, 0, 3, 10, 0, 7))
    assert msgspec.msgpack.Decoder(EngineOutput).decode(msgspec.msgpack.encode(out)) == out


def test_sampling_params_reject_bad_values() -> None:
    with pytest.raises(Exception, match="top_p"):
        SamplingParams(top_p=0.0)


def test_openapi_hides_test_fields_unless_test_hooks() -> None:
    from types import SimpleNamespace

    from agentspeed.entrypoints.openai.api_server import build_app
    from agentspeed.entrypoints.openai.serving import ServerState

    def props(hooks: bool) -> set[str]:
        state = ServerState(SimpleNamespace(), "m", SimpleNamespace(), "hermes", enable_test_hooks=hooks)  # type: ignore[arg-type]
        schemas = build_app(state).openapi()["components"]["schemas"]
        return {p for name in ("ChatCompletionRequest", "MessagesRequest", "ResponsesRequest")
                for p in schemas[name]["properties"]}

    assert "agentspeed_test_output" not in props(False)
    assert "agentspeed_test_output" in props(True)
