"""Constrained decoding on the default model (SmolLM2-135M GGUF), engine side, with both
grammar backends: sampled JSON-schema outputs validate (jsonschema) on every seeded run,
regex / choice / grammar constraints hold, free requests in a mixed batch get the tokens
they get alone, a budget too small ends with "length", bad constraints are refused at
admission. Unit tests of the bitmask, rollback and the forced-call schema are at the end;
the APIs are tested in test_structured_api.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import pytest
import torch

from agentspeed.engine.llm import LLM
from agentspeed.entrypoints.parsers.output import OutputParser
from agentspeed.entrypoints.parsers.tool_parsers import ForcedCallsParser
from agentspeed.entrypoints.structured import forced_tool_calls
from agentspeed.sampling_params import SamplingParams, StructuredOutputs
from agentspeed.structured.bitmask import allocate, apply_bitmask

BACKENDS = ["xgrammar", "guidance"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address"],
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request: pytest.FixtureRequest) -> Iterator[LLM]:
    engine = LLM(structured_output_backend=request.param)
    yield engine
    engine.shutdown()


def constrained(so: StructuredOutputs, **kw: object) -> SamplingParams:
    return SamplingParams(structured_outputs=so, **kw)  # type: ignore[arg-type]


def test_json_schema_validates_on_every_seeded_run(llm: LLM) -> None:
    so = StructuredOutputs(json=json.dumps(PERSON))
    outs = llm.chat([ASK] * 24, [constrained(so, max_tokens=200, temperature=1.0, seed=s) for s in range(24)])
    texts = set()
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), PERSON)
        texts.add(c.text)
    assert len(texts) > 12  # sampled, not one answer repeated


def test_json_object_regex_choice_and_grammar(llm: LLM) -> None:
    greedy = {"max_tokens": 150, "temperature": 0.0}
    short = [{"role": "user", "content": "What is 2+2? Answer in JSON with the key answer."}]
    obj, rx, ch, gr = llm.chat([short, ASK, ASK, ASK], [
        constrained(StructuredOutputs(json_object=True), **greedy),
        constrained(StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2,4}"), **greedy),
        constrained(StructuredOutputs(choice=["yes", "no", "maybe later"]), **greedy),
        constrained(StructuredOutputs(grammar='root ::= "Answer: " ("red" | "green") "."'), **greedy),
    ])
    assert obj.outputs[0].finish_reason == "stop" and isinstance(json.loads(obj.outputs[0].text), dict)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", rx.outputs[0].text), rx.outputs[0].text
    assert ch.outputs[0].text in ("yes", "no", "maybe later")
    assert gr.outputs[0].text in ("Answer: red.", "Answer: green."), gr.outputs[0].text
    for s in range(6):  # sampled choices stay within the set too
        [o] = llm.chat([ASK], constrained(StructuredOutputs(choice=["alpha", "beta"]), temperature=1.5, seed=s))
        assert o.outputs[0].text in ("alpha", "beta")


def test_free_requests_unchanged_by_constrained_neighbours(llm: LLM) -> None:
    free = [SamplingParams(max_tokens=24, temperature=0.0), SamplingParams(max_tokens=24, temperature=0.9, seed=7)]
    prompts = [[{"role": "user", "content": "Write a haiku about rain."}],
               [{"role": "user", "content": "Name three rivers."}]]
    alone = [o.outputs[0].token_ids for o in llm.chat(prompts, free)]
    so = StructuredOutputs(json=json.dumps(PERSON))
    mixed = llm.chat([ASK, prompts[0], ASK, prompts[1]],
                     [constrained(so, max_tokens=100, temperature=1.0, seed=1), free[0],
                      constrained(so, max_tokens=100, temperature=1.0, seed=2), free[1]])
    assert [mixed[1].outputs[0].token_ids, mixed[3].outputs[0].token_ids] == alone
    jsonschema.validate(json.loads(mixed[0].outputs[0].text), PERSON)


def test_budget_too_small_ends_with_length(llm: LLM) -> None:
    [o] = llm.chat([ASK], constrained(StructuredOutputs(json=json.dumps(PERSON)), max_tokens=6, temperature=0.0))
    c = o.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


@pytest.mark.parametrize("so,needle", [
    (StructuredOutputs(json='{"type": "object", "properties": {"a": {"type": "strin"}}}'), "strin"),
    (StructuredOutputs(regex="a(b"), "regex"),
    (StructuredOutputs(grammar="root ::= undefined_rule"), "grammar"),
])
def test_bad_constraints_refused_at_admission(llm: LLM, so: StructuredOutputs, needle: str) -> None:
    [o] = llm.chat([ASK], constrained(so, max_tokens=8))
    c = o.outputs[0]
    assert c.finish_reason == "error" and not c.token_ids
    assert needle in c.text and "invalid" in c.text


def test_structural_tag_xgrammar_only(llm: LLM) -> None:
    tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool_call>"],
           "at_least_one": True, "stop_after_first": True, "tags": [{"begin": "<tool_call>", "end": "</tool_call>",
           "content": {"type": "json_schema", "json_schema": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]}}
    [o] = llm.chat([ASK], constrained(StructuredOutputs(structural_tag=json.dumps(tag)), max_tokens=40,
                                      temperature=0.0))
    c = o.outputs[0]
    if llm.engine.structured.backend_name == "guidance":  # llguidance reads no structural tags: a named refusal
        assert c.finish_reason == "error" and "xgrammar" in c.text
        return
    body = c.text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
    assert isinstance(json.loads(body)["city"], str), c.text


def test_grammar_cache_and_drafting_off(llm: LLM) -> None:
    mgr = llm.engine.structured
    so = StructuredOutputs(json=json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                            "required": ["ok"]}))
    hits, spec_off = mgr.hits, llm.engine.num_spec_disabled_structured
    outs = llm.chat([ASK] * 3, constrained(so, max_tokens=20, temperature=0.0))
    assert all(json.loads(o.outputs[0].text) in ({"ok": True}, {"ok": False}) for o in outs)
    assert mgr.hits >= hits + 2  # compiled once, then looked up
    # Greedy requests draft by default on CPU; constrained ones do not, and are counted.
    assert llm.engine.cfg.scheduling.num_speculative_tokens
    assert llm.engine.num_spec_disabled_structured == spec_off + 3


def test_matcher_rollback_restores_the_mask(llm: LLM) -> None:
    mgr = llm.engine.structured
    assert llm.tokenizer is not None
    m = mgr.matcher(mgr.compile(StructuredOutputs(json=json.dumps(PERSON))))
    vocab = llm.runner.model_config.vocab_size
    before, after = allocate(1, vocab), allocate(1, vocab)
    prefix = llm.tokenizer.encode('{"name": "Al', add_special_tokens=False)
    if mgr.backend_name == "guidance":
        prefix = llm.tokenizer.encode('{"name":"Al', add_special_tokens=False)
    assert all(m.accept(t) for t in prefix[:2])
    m.fill(before, 0)
    assert all(m.accept(t) for t in prefix[2:])
    m.rollback(len(prefix) - 2)
    m.fill(after, 0)
    assert torch.equal(before, after)
    assert not m.accept(llm.tokenizer.encode("}", add_special_tokens=False)[0]) or mgr.backend_name == "guidance"


# ---- units -------------------------------------------------------------------------------
def test_apply_bitmask_matches_a_boolean_mask() -> None:
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    bits = torch.randint(0, 2, (5, 32 * 32), generator=g, dtype=torch.int64)[:, :vocab].bool()
    words = torch.zeros(5, 32, dtype=torch.int64)
    padded = torch.zeros(5, 32 * 32, dtype=torch.int64)
    padded[:, :vocab] = bits.long()
    for j in range(32):
        words |= padded.view(5, 32, 32)[:, :, j] << j
    mask = allocate(5, vocab)
    mask.copy_(words.to(torch.int64).apply_(lambda w: w - (1 << 32) if w >= 1 << 31 else w).to(torch.int32))
    logits = torch.randn(5, vocab, generator=g)
    ref = logits.clone()
    rows = [0, 2, 3]
    apply_bitmask(logits, mask, rows)
    for r in range(5):
        expect = ref[r].masked_fill(~bits[r], float("-inf")) if r in rows else ref[r]
        assert torch.equal(logits[r], expect), r
    whole = ref.clone()
    apply_bitmask(whole, mask, list(range(5)))
    assert torch.equal(whole, ref.masked_fill(~bits, float("-inf")))


TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}},
    {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                         "required": ["path"]}},
]


def test_forced_tool_schema_round_trips_through_the_parser() -> None:
    schema = json.loads(forced_tool_calls(TOOLS, None).json or "")
    out = '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, ' \
          '{"name": "read_file", "arguments": {"path": "a.py"}}]'
    jsonschema.validate(json.loads(out), schema)
    parsed = OutputParser(None, ForcedCallsParser(TOOLS)).parse(out)
    assert parsed.calls == [("get_weather", '{"city": "Oslo", "unit": "c"}'), ("read_file", '{"path": "a.py"}')]
    named = json.loads(forced_tool_calls(TOOLS, "read_file").json or "")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(out), named)  # two calls, and one of the wrong tool
    assert list(named["items"]["properties"]) == ["name", "arguments"]  # the name is written first
