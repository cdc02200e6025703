"""Hybrid KV: the sliding-window layers of Gemma 3 / GPT-OSS / Mistral keep only their
window's pages, in a pool of their own, and give the rest back as the window moves.

Through the whole engine, against transformers: prompts several windows long (chunked
prefill and decode across page boundaries), with every free window page poisoned with NaN
before each step (a kernel reading a given-back page would turn the output to NaN); pages
held stay within a window plus a chunk; the prefix cache finds a turn's last window for
the next turn and a shared prefix's window for another request; the pools' invariants hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from test_hf_parity import hf_greedy

from agentspeed.config import CacheConfig, EngineConfig, SchedulingConfig
from agentspeed.control.page_pool import PageState
from agentspeed.control.plan import RequestSpec
from agentspeed.engine.core import EngineCore
from agentspeed.execution.kv_cache import WINDOW_POOL_SHARE, split_pages, window_group
from agentspeed.modeling.loaders.safetensors_loader import read_model_config as model_config
from agentspeed.sampling_params import SamplingParams

PS = 8
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

# gemma3: sliding (11 tokens) + global layer; gpt_oss: sliding (7) + global, sinks;
# mistral-window: every layer windowed (9), so the full pool holds no KV at all.
KINDS = {"gemma3": ("gemma3", {}), "gpt_oss": ("gpt_oss", {}), "mistral-window": ("mistral", {"sliding_window": 9})}


@pytest.fixture(scope="module", params=sorted(KINDS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kind, overrides = KINDS[request.param]
    return make_tiny(kind, tmp_path_factory.mktemp(request.param), **overrides)


def engine(path: Path, *, prefix_caching: bool = True, window_pages: int | None = None, hybrid: bool = True,
           drafts: int = 0) -> EngineCore:
    cfg = EngineConfig(
        model=str(path),
        cache=CacheConfig(page_size=PS, num_pages=64, window_num_pages=window_pages, hybrid_kv=hybrid),
        scheduling=SchedulingConfig(max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=prefix_caching,
                                    num_speculative_tokens=drafts),
    )
    return EngineCore.build(cfg)


def poison_free_window_pages(core: EngineCore) -> None:
    wpool = core.scheduler.wpool
    assert wpool is not None
    free = [p for p in range(1, wpool.num_pages) if wpool.state[p] == PageState.FREE]
    if not free:
        return
    idx = torch.tensor(free)
    for i in core.runner.kv.window_layers:
        kv = core.runner.kv.layers[i]
        kv.k[idx] = float("nan")
        assert kv.v is not None
        kv.v[idx] = float("nan")


def run(core: EngineCore, prompts: dict[str, list[int]], params: SamplingParams = GREEDY,
        poison: bool = False) -> tuple[dict[str, list[int]], dict[str, int], int]:
    """Greedy outputs, cached tokens per request and the most window pages held at once (0
    for an engine with one pool)."""
    for rid, p in prompts.items():
        core.add_request(RequestSpec(rid, tuple(p), params.max_tokens, params=params))
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    cached: dict[str, int] = {}
    most = 0
    wpool = core.scheduler.wpool
    for _ in range(5000):
        if not core.has_work():
            break
        if poison:
            poison_free_window_pages(core)
        for u in core.step():
            out[u.request_id].extend(u.new_token_ids)
            cached[u.request_id] = u.num_cached_tokens
            assert not u.message, u.message
        core.scheduler.check_invariants()
        if wpool is not None:
            most = max(most, wpool.num_in_use())
    else:
        raise AssertionError("the engine did not finish (stuck on window pages?)")
    return out, cached, most


def test_window_group_and_pool_split(model: Path) -> None:
    cfg = model_config(model)
    w, layers = window_group(cfg, 4096) or (0, ())
    assert w == cfg.sliding_window and layers == tuple(i for i in range(cfg.num_layers) if cfg.window(i))
    assert window_group(cfg, w) is None  # a window as long as the context frees nothing
    # For the same bytes the hybrid split keeps more full-context tokens than one pool does.
    layer_page, budget = 1000, 10_000_000
    full, win = split_pages(budget, cfg.num_layers - len(layers), len(layers), layer_page, 10, 5000)
    assert (full * (cfg.num_layers - len(layers)) + win * len(layers)) * layer_page <= budget
    if len(layers) < cfg.num_layers:
        assert full > budget // (cfg.num_layers * layer_page)
        assert win == -(-full // WINDOW_POOL_SHARE)
    else:
        assert (full, win) == (5000, budget // (cfg.num_layers * layer_page))


def test_gemma3_pattern_holds_more_context_per_byte() -> None:
    """Gemma 3's 5 window layers per global one: the same bytes hold 2.7x the context."""
    layer_page, budget = 4096, 1 << 30
    one_pool = budget // (6 * layer_page)
    full, win = split_pages(budget, 1, 5, layer_page, 100, 1 << 30)
    assert full / one_pool > 2.6 and win == -(-full // WINDOW_POOL_SHARE)


def test_tokens_match_transformers_with_given_back_pages_poisoned(model: Path) -> None:
    """Prompts of 10-12 windows, two at once; every free window page is NaN before each step,
    so reading one would show. Window pages in use stay within two windows plus chunks."""
    core = engine(model, prefix_caching=False)
    try:
        w = core.runner.kv.window
        assert w is not None and core.scheduler.wpool is not None
        prompts = {"a": [(7 * i) % 97 + 3 for i in range(12 * w)], "b": [(3 * i) % 91 + 5 for i in range(10 * w)]}
        out, _, most = run(core, prompts, poison=True)
        for rid, p in prompts.items():
            assert out[rid] == hf_greedy(model, p, GREEDY.max_tokens)[0], rid
        # per request: its window, the slack page, one 16-token chunk's pages and a page it crosses
        bound = 2 * (-(-(w + 16) // PS) + 3)
        assert most <= bound, (most, bound)
        assert sum(-(-(len(p) + GREEDY.max_tokens) // PS) for p in prompts.values()) > 2 * bound
        assert core.scheduler.wpool.num_in_use() == 0
    finally:
        core.shutdown()


def test_same_tokens_as_one_pool_with_drafts(model: Path) -> None:
    """Speculative drafts allocate window pages too; the tokens equal the non-hybrid engine's."""
    prompts = {"a": [3, 4, 5, 6] * 12, "b": list(range(9, 60))}
    hybrid = engine(model, drafts=3)
    try:
        out, _, _ = run(hybrid, prompts)
    finally:
        hybrid.shutdown()
    plain = engine(model, hybrid=False, drafts=3)
    try:
        assert plain.scheduler.wpool is None
        ref, _, _ = run(plain, prompts)
    finally:
        plain.shutdown()
    assert out == ref


def test_prefix_cache_finds_the_last_window_across_turns(model: Path) -> None:
    core = engine(model)
    try:
        w = core.runner.kv.window
        assert w is not None
        turn1 = [(5 * i) % 89 + 2 for i in range(4 * w + 3)]
        out, _, _ = run(core, {"t1": turn1})
        turn2 = turn1 + out["t1"] + [42, 43, 44]
        out2, cached, _ = run(core, {"t2": turn2})
        # the first turn's whole confirmed KV, page-aligned (its last sampled token has none)
        assert cached["t2"] == (len(turn1) + GREEDY.max_tokens - 1) // PS * PS
        assert out2["t2"] == hf_greedy(model, turn2, GREEDY.max_tokens)[0]
        # A different request sharing turn 1's prompt: its window pages were given back
        # while turn 1 ran, published first, so the hit still reaches the shared prefix.
        other = [*turn1, 77, 78]
        out3, cached3, _ = run(core, {"o": other})
        assert cached3["o"] == len(turn1) // PS * PS
        assert out3["o"] == hf_greedy(model, other, GREEDY.max_tokens)[0]
    finally:
        core.shutdown()


def test_small_window_pool_waits_and_preempts_without_deadlock(model: Path) -> None:
    """A window pool for little more than one request's window and chunk: four long prompts
    still all finish, with the tokens they get alone."""
    cfg = model_config(model)
    w = cfg.sliding_window
    assert w is not None
    need = -(-(w + 16) // PS) + 2  # Scheduler._window_pages_needed
    core = engine(model, window_pages=need + 3)
    try:
        prompts = {f"r{i}": [(i * 13 + 3 * j) % 83 + 1 for j in range(3 * w + i)] for i in range(4)}
        out, _, most = run(core, prompts)
        assert most <= need + 2
        for rid, p in prompts.items():
            assert out[rid] == hf_greedy(model, p, GREEDY.max_tokens)[0], rid
    finally:
        core.shutdown()


def test_metrics_report_the_window_pool(model: Path) -> None:
    """/metrics (the same collector) shows the window pool beside the full one, parsed as
    Prometheus text; a model without windows shows no window gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    from agentspeed.engine.core_proc import _Core
    from agentspeed.entrypoints.openai.metrics import Metrics

    def gauges(core: EngineCore) -> dict[str, float]:
        text = Metrics("m", _Core(core).stats).render().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    core = engine(model)
    try:
        w = core.runner.kv.window
        assert w is not None
        core.add_request(RequestSpec("a", tuple(range(3, 3 + 4 * w)), 8, params=GREEDY))
        core.step()
        g = gauges(core)
        assert g["agentspeed:kv_window_pages_total"] == core.scheduler.wpool.num_usable  # type: ignore[union-attr]
        assert 0 < g["agentspeed:kv_window_pages_used"] <= g["agentspeed:kv_window_pages_total"]
    finally:
        core.shutdown()
    plain = engine(model, hybrid=False)
    try:
        assert "agentspeed:kv_window_pages_total" not in gauges(plain)
    finally:
        plain.shutdown()
