"""The engine end to end (offline LLM API): batch invariance under every scheduling mode,
multi-turn prefix caching, preemption, aborts, and the SamplingParams surface."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agentspeed.engine.llm import LLM
from agentspeed.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def mixed_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(40)]  # an agent-style shared system prefix
    prompts = []
    for i in range(n):
        body = [rng.randrange(vocab) for _ in range(rng.randrange(1, 90))]
        prompts.append((shared + body) if i % 2 else body)
    return prompts


@pytest.fixture(scope="module")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


def run(path: Path, prompts: list[list[int]], **kw: object) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(path), skip_tokenizer_init=True, page_size=8, **kw)  # type: ignore[arg-type]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [o.outputs[0].token_ids for o in outs], llm


def test_batch_invariance_across_scheduling_modes(tiny_llama: Path) -> None:
    prompts = mixed_prompts(64, 384)
    alone_llm = LLM(str(tiny_llama), skip_tokenizer_init=True, page_size=8, enable_prefix_caching=False)
    alone = [alone_llm.generate({"prompt_token_ids": p}, GREEDY)[0].outputs[0].token_ids for p in prompts]
    alone_llm.shutdown()
    modes = {
        "overlap+cache": {"overlap": True},
        "no-overlap": {"overlap": False},
        "no-cache": {"enable_prefix_caching": False},
        "small-budget": {"max_num_batched_tokens": 64, "max_num_seqs": 8},
    }
    for name, kw in modes.items():
        got, llm = run(tiny_llama, prompts, **kw)
        assert got == alone, name
        llm.shutdown()
    # A pool so small that requests must be preempted (and recomputed) to make progress.
    got, llm = run(tiny_llama, prompts, num_kv_pages=40, overlap=True)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == alone
    pool = llm.engine.scheduler.pool
    pool.check_invariants()
    assert pool.num_available() == pool.num_usable


def test_multi_turn_reuses_previous_turn(tiny_llama: Path) -> None:
    outs = []
    for caching, partial in ((True, True), (True, False), (False, False)):
        llm = LLM(str(tiny_llama), skip_tokenizer_init=True, page_size=8, enable_prefix_caching=caching,
                  partial_page_reuse=partial)
        turn1 = mixed_prompts(1, 384, seed=3)[0] + list(range(60))
        [o1] = llm.generate({"prompt_token_ids": turn1}, GREEDY)
        answer = o1.outputs[0].token_ids
        turn2 = turn1 + answer + [7, 8, 9, 10, 11]
        [o2] = llm.generate({"prompt_token_ids": turn2}, GREEDY)
        # Turn 1 left KV for its prompt and answer except the last sampled token (it was
        # never fed back): all of it is a hit with partial pages, its full pages without.
        kv = len(turn1) + len(answer) - 1
        assert kv % 8, "the test needs turn 1 to end inside a page"
        assert o2.num_cached_tokens == (kv if partial else kv // 8 * 8 if caching else 0)
        assert llm.engine.scheduler.num_partial_hit_tokens == (kv % 8 if partial else 0)
        outs.append(o2.outputs[0].token_ids)
        llm.shutdown()
    assert outs[0] == outs[1] == outs[2]  # the same tokens as recomputing them


def test_abort_mid_prefill_and_mid_decode_frees_pages(tiny_llama: Path) -> None:
    from agentspeed.control.plan import RequestSpec

    llm = LLM(str(tiny_llama), skip_tokenizer_init=True, page_size=8, max_num_batched_tokens=32)
    eng = llm.engine
    eng.add_request(RequestSpec("dec", (1, 2, 3), 50), GREEDY)
    eng.add_request(RequestSpec("long", tuple(range(1, 200)), 8), GREEDY)
    states = set()
    for _ in range(4):
        eng.step()
        states |= {type(r.state).__name__ for r in eng.scheduler._running}
    assert {"Prefilling", "Decoding"} <= states
    eng.abort("long")
    eng.abort("dec")
    while eng.has_work():
        eng.step()
    eng.scheduler.check_invariants()
    pool = eng.scheduler.pool
    assert pool.num_available() == pool.num_usable


def test_rejects_requests_that_cannot_fit(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), skip_tokenizer_init=True, page_size=8, max_model_len=128)
    [out] = llm.generate({"prompt_token_ids": list(range(120))}, SamplingParams(max_tokens=20))
    assert out.outputs[0].finish_reason == "error" and "context length" in out.outputs[0].text


@pytest.fixture(scope="module")
def smol() -> LLM:
    return LLM()


def test_sampling_params_surface(smol: LLM) -> None:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    [greedy] = smol.chat(chat, SamplingParams(max_tokens=24, temperature=0))
    text = greedy.outputs[0].text
    assert "Paris" in text and greedy.outputs[0].finish_reason == "stop"
    # stop string: cut before it, reason reported
    [stopped] = smol.chat(chat, SamplingParams(max_tokens=24, temperature=0, stop=["Paris", "zzz"]))
    out = stopped.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "Paris"
    assert text.startswith(out.text) and "Paris" not in out.text
    # seed reproducibility, and n samples with distinct seeds
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=123)
    a, b = smol.chat(chat, p)[0], smol.chat(chat, p)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    [many] = smol.chat(chat, SamplingParams(max_tokens=16, temperature=1.0, seed=5, n=3))
    assert len(many.outputs) == 3 and len({tuple(o.token_ids) for o in many.outputs}) > 1
    # logprobs: chosen token included, top alternatives sorted, greedy picks the best
    [lp] = smol.chat(chat, SamplingParams(max_tokens=4, temperature=0, logprobs=3))
    for tok, entry in zip(lp.outputs[0].token_ids, lp.outputs[0].logprobs or []):
        assert tok in entry and entry[tok] == max(entry.values()) and len(entry) == 3
    # ignore_eos + max_tokens gives exactly max_tokens; min_tokens holds EOS back
    [forced] = smol.chat(chat, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert len(forced.outputs[0].token_ids) == 40 and forced.outputs[0].finish_reason == "length"
    # penalties change greedy output
    [pen] = smol.chat(chat, SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.8,
                                           presence_penalty=1.0, frequency_penalty=1.0))
    assert pen.outputs[0].token_ids != greedy.outputs[0].token_ids


def test_prompt_forms_and_shapes(smol: LLM) -> None:
    assert smol.tokenizer is not None
    ids = smol.tokenizer.encode("The capital of France is")
    by_text = smol.generate("The capital of France is", SamplingParams(max_tokens=6, temperature=0))[0]
    by_ids = smol.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=6, temperature=0))[0]
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.prompt == "The capital of France is" and by_text.prompt_token_ids == ids
    assert by_text.finished and by_text.outputs[0].finish_reason in ("stop", "length")
