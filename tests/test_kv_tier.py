"""The host KV tier: the copies themselves (exact bit for bit, int8 within its bound), the
engine loading evicted prefixes back with the same greedy tokens as a cold prefill,
preempted requests resuming from it, aborts around loads, and the configurations refused."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import make_tiny

from agentspeed.control.plan import RequestSpec
from agentspeed.engine.llm import LLM
from agentspeed.errors import ConfigError
from agentspeed.execution.kv_tier import HostKVTier, resolve_mode
from agentspeed.modeling.context import LayerKV
from agentspeed.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PS = 8


def _layers(dtype: torch.dtype, mla: bool = False, fp8: bool = False) -> list[LayerKV]:
    g = torch.Generator().manual_seed(0)
    shape = (12, PS, 40) if mla else (12, PS, 2, 16)

    def t() -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 3).to(dtype)

    def sc() -> torch.Tensor | None:
        return torch.rand(shape[:2], generator=g) + 0.5 if fp8 else None

    return [LayerKV(t(), None if mla else t(), sc(), None if mla else sc()) for _ in range(3)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("mla", [False, True])
def test_exact_tier_round_trip_is_bit_exact(dtype: torch.dtype, mla: bool) -> None:
    layers = _layers(dtype, mla, fp8=dtype == torch.float8_e4m3fn)
    before = [[x.clone() for x in (kv.k, kv.v, kv.k_scale, kv.v_scale) if x is not None] for kv in layers]
    tier = HostKVTier(layers, 5, "exact")
    tier.store([3, 7, 9], [4, 0, 2])
    tier.load([0, 4, 2], [1, 2, 11])  # page 7 -> 1, page 3 -> 2, page 9 -> 11
    for kv, old in zip(layers, before, strict=True):
        for now, was in zip([x for x in (kv.k, kv.v, kv.k_scale, kv.v_scale) if x is not None], old, strict=True):
            for dst, src in ((1, 7), (2, 3), (11, 9)):
                assert torch.equal(now[dst].view(torch.uint8) if now.dtype.itemsize == 1 else now[dst],
                                   was[src].view(torch.uint8) if was.dtype.itemsize == 1 else was[src])
            assert torch.equal(_bytes(now[5]), _bytes(was[5]))  # pages not loaded into are untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mla", [False, True])
def test_int8_tier_error_within_half_a_step(dtype: torch.dtype, mla: bool) -> None:
    layers = _layers(dtype, mla)
    orig = [kv.k[4].float().clone() for kv in layers]
    tier = HostKVTier(layers, 2, "int8")
    tier.store([4], [1])
    tier.load([1], [6])
    for kv, x in zip(layers, orig, strict=True):
        bound = x.abs().amax(-1, keepdim=True) / 254
        if dtype == torch.bfloat16:  # the load rounds back to bf16: half its ulp more
            bound = bound + x.abs() * 2.0**-8
        err = (kv.k[6].float() - x).abs()
        assert (err <= bound * 1.0001 + 1e-12).all(), float((err - bound).max())
        assert err.max() > 0  # it is lossy: the bound is what is being tested
    per = HostKVTier.slot_bytes(layers, "int8")
    assert per < HostKVTier.slot_bytes(layers, "exact") * (0.4 if dtype == torch.float32 else 0.7)


def test_tier_modes_resolve_per_device_and_refuse_int8_of_fp8() -> None:
    assert resolve_mode("auto", "cpu", torch.float32) == "int8"
    assert resolve_mode("auto", "cuda", torch.bfloat16) == "exact"
    assert resolve_mode("auto", "cpu", torch.float8_e4m3fn) == "exact"
    with pytest.raises(ConfigError, match="fp8"):
        resolve_mode("int8", "cpu", torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


def _llm(path: Path, **kw: object) -> LLM:
    return LLM(str(path), skip_tokenizer_init=True, page_size=PS, **kw)  # type: ignore[arg-type]


def _gen(llm: LLM, prompt: list[int]) -> tuple[list[int], int]:
    [o] = llm.generate({"prompt_token_ids": prompt}, GREEDY)
    return o.outputs[0].token_ids, o.num_cached_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_write_back_copies_what_store_copies(dtype: torch.dtype) -> None:
    """begin_store/finish_store (a write-back) leaves the slots store leaves, even with other
    pages written between them (what the forward beside it does)."""
    layers = _layers(dtype, fp8=dtype == torch.float8_e4m3fn)
    a, b = HostKVTier(layers, 4, "exact"), HostKVTier(layers, 4, "exact")
    a.store([3, 7], [1, 2])
    b.begin_store([3, 7], [1, 2])
    with pytest.raises(AssertionError, match="already in flight"):
        b.begin_store([5], [0])
    for kv in layers:
        kv.k[5].zero_()
    b.finish_store()
    b.finish_store()  # (nothing in flight: nothing to do)
    for slot in (1, 2):
        assert a.read_slot(slot) == b.read_slot(slot)


@pytest.mark.parametrize(("mode", "writeback"), [("exact", True), ("exact", False), ("int8", True)])
def test_evicted_prefix_loads_back_with_cold_prefill_tokens(tiny_llama: Path, mode: str, writeback: bool) -> None:
    """Turn 1 of session A, then B's prompt, which evicts A's pages from a pool of 30 pages;
    A's second turn loads them back from the tier and decodes what a cold prefill decodes,
    whether the pages were copied ahead of their eviction (write-back) or when evicted."""
    rng = random.Random(1)
    a = [rng.randrange(384) for _ in range(150)]
    b = [rng.randrange(384) for _ in range(200)]
    cold = _llm(tiny_llama, enable_prefix_caching=False)
    llm = _llm(tiny_llama, num_kv_pages=31, kv_offload_memory=1 << 20, kv_offload_dtype=mode,
               kv_offload_writeback=writeback)
    sched = llm.engine.scheduler
    assert sched.tier is not None and llm.runner.tier is not None and llm.runner.tier.mode == mode
    ans_a, _ = _gen(llm, a)
    _gen(llm, b)
    assert sched.pool.evictions > 0 and sched.tier.stores > 0
    assert (sched.num_tier_writebacks > 0) == writeback
    turn2 = a + ans_a + [5, 6, 7]
    got, cached = _gen(llm, turn2)
    want, _ = _gen(cold, turn2)
    assert sched.num_tier_hit_tokens >= 16 and cached >= sched.num_tier_hit_tokens
    assert got == want
    sched.check_invariants()
    assert not any(sched.tier.pins)
    # The flush drops the tier's copies too: the same turn is then all recomputed.
    llm.engine.scheduler.flush_cache()
    assert len(sched.tier) == 0
    _, cached = _gen(llm, turn2)
    assert cached == 0
    cold.shutdown()
    llm.shutdown()


def test_preempted_requests_resume_from_the_tier(tiny_llama: Path) -> None:
    """A pool so small that requests are preempted: the pages they lose while waiting come
    back from the tier (a swap), and every output equals the request run alone."""
    rng = random.Random(2)
    shared = [rng.randrange(384) for _ in range(40)]
    prompts = [shared + [rng.randrange(384) for _ in range(rng.randrange(20, 90))] for _ in range(16)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = _llm(tiny_llama, enable_prefix_caching=False)
    want = [alone.generate({"prompt_token_ids": p}, params)[0].outputs[0].token_ids for p in prompts]
    llm = _llm(tiny_llama, num_kv_pages=40, kv_offload_memory=1 << 20, kv_offload_dtype="exact")
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    sched = llm.engine.scheduler
    assert sched.num_preemptions > 0 and sched.num_tier_hit_tokens > 0
    assert got == want
    sched.check_invariants()
    assert sched.pool.num_available() == sched.pool.num_usable and not any(sched.tier.pins)  # type: ignore[union-attr]
    alone.shutdown()
    llm.shutdown()


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_while_loading_frees_pages_and_tier_pins(tiny_llama: Path, overlap: bool) -> None:
    rng = random.Random(3)
    a = [rng.randrange(384) for _ in range(120)]
    llm = _llm(tiny_llama, num_kv_pages=24, kv_offload_memory=1 << 20, overlap=overlap,
               max_num_batched_tokens=16)
    eng = llm.engine
    sched = eng.scheduler
    _gen(llm, a)
    _gen(llm, [rng.randrange(384) for _ in range(150)])  # evicts A
    eng.add_request(RequestSpec("a2", (*a, 1, 2, 3), 8), GREEDY)
    eng.step()  # plans (and with overlap: launches) the step loading A's pages
    assert sched.num_tier_hit_tokens > 0
    eng.abort("a2")
    while eng.has_work():
        eng.step()
    sched.check_invariants()
    assert sched.pool.num_available() == sched.pool.num_usable and not any(sched.tier.pins)  # type: ignore[union-attr]
    llm.shutdown()


def test_tier_configurations_refused(tmp_path: Path, tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match="prefix cache"):
        _llm(tiny_llama, enable_prefix_caching=False, kv_offload_memory=1 << 20)
    with pytest.raises(ConfigError, match="holds no page"):
        _llm(tiny_llama, kv_offload_memory=64)
    gemma = make_tiny("gemma3", tmp_path)
    with pytest.raises(ConfigError, match="sliding-window"):
        _llm(gemma, kv_offload_memory=1 << 20)
    with pytest.raises(ConfigError, match="offload dtype"):
        _llm(tiny_llama, kv_offload_memory=1 << 20, kv_offload_dtype="fp4")


@pytest.mark.parametrize("damage", [None, "corrupt", "missing", "swapped"])
def test_disk_tier_round_trip_and_damaged_files_recompute(tmp_path: Path, tiny_llama: Path,
                                                          damage: str | None) -> None:
    """A turn evicted to disk comes back with a cold prefill's tokens; corrupt, missing or
    swapped files (another page's valid copy) are misses, recomputed, never loaded."""
    rng = random.Random(4)
    a = [rng.randrange(384) for _ in range(150)]
    cold = _llm(tiny_llama, enable_prefix_caching=False)
    # a pool of 30 pages, a host tier of 24 above a disk tier of 96: two 220-token prompts
    # after a 150-token turn push it through the host tier onto disk
    page = HostKVTier.slot_bytes(cold.runner.kv.layers, "exact")
    llm = _llm(tiny_llama, num_kv_pages=31, kv_offload_memory=24 * page, kv_offload_dtype="exact",
               kv_offload_dir=str(tmp_path), kv_offload_disk=96 * (page + 64))
    sched, runner = llm.engine.scheduler, llm.runner
    assert sched.tier is not None and sched.tier.num_slots == 24 and sched.disk is not None and runner.disk is not None
    ans_a, _ = _gen(llm, a)
    for _ in range(2):
        _gen(llm, [rng.randrange(384) for _ in range(220)])
    runner.disk._writer.submit(lambda: None).result()  # the spills are on disk
    files = sorted(runner.disk.dir.glob("*.kv"))
    assert len(files) >= 8 and sched.disk is not None and len(sched.disk) == len(files)
    if damage == "corrupt":
        for f in files:
            data = bytearray(f.read_bytes())
            data[-1] ^= 0xFF
            f.write_bytes(bytes(data))
    elif damage == "missing":
        for f in files:
            f.unlink()
    elif damage == "swapped":  # right format and checksum, another page's copy
        blobs = [f.read_bytes() for f in files]
        for f, blob in zip(files, blobs[1:] + blobs[:1], strict=True):
            f.write_bytes(blob)
    turn2 = a + ans_a + [5, 6, 7]
    got, cached = _gen(llm, turn2)
    want, _ = _gen(cold, turn2)
    assert got == want
    if damage is None:
        assert sched.num_disk_hit_tokens >= 8 * PS and sched.num_disk_failed == 0
        assert cached >= sched.num_disk_hit_tokens
    else:
        assert sched.num_disk_failed > 0 and sched.num_disk_hit_tokens == 0
    sched.check_invariants()
    assert not any(sched.tier.pins) and not any(sched.disk.pins)
    cold.shutdown()
    llm.shutdown()


def test_cost_model_is_measured_and_recomputes_when_loading_costs_more(tiny_llama: Path) -> None:
    """The engine measures load and prefill costs as it runs; a tier whose pages cost more
    to load than to recompute is not used (the same tokens either way)."""
    from agentspeed.control.tier import TierCost

    rng = random.Random(5)
    a = [rng.randrange(384) for _ in range(300)]
    llm = _llm(tiny_llama, num_kv_pages=45, kv_offload_memory=1 << 20, kv_offload_dtype="exact")
    sched = llm.engine.scheduler
    ans, _ = _gen(llm, a)
    _gen(llm, [rng.randrange(384) for _ in range(340)])
    turn2 = a + ans + [1, 2]
    got, _ = _gen(llm, turn2)
    cost = sched.tier_cost
    assert sched.num_tier_hit_tokens > 0 and cost.load_s is not None and cost.prefill_s is not None
    assert cost.use_host(PS)  # measured here: loading a page is far cheaper than recomputing it
    before = sched.num_tier_hit_tokens
    _gen(llm, [rng.randrange(384) for _ in range(340)])  # evicts turn 2 to the tier
    llm.engine.measure_tier_cost = False
    sched.tier_cost = TierCost(load_s=1.0, prefill_s=1e-3)  # 1 s a page against 8 ms to recompute it
    again, _ = _gen(llm, turn2)
    assert sched.num_tier_hit_tokens == before and again == got
    llm.shutdown()


def test_tier_cost_decisions() -> None:
    from agentspeed.control.tier import TierCost

    c = TierCost()
    assert c.use_host(16) and c.use_disk(16)  # unmeasured: try the tier, which measures it
    c.observe((0.004, 10), (0.0, 0), (2.0, 1000))  # 0.4 ms a page against 32 ms to recompute
    assert c.load_s == pytest.approx(4e-4) and c.use_host(16) and c.use_disk(16)
    c.observe((0.0, 0), (0.5, 10), (0.0, 0))  # disk reads of 50 ms a page: not worth it
    assert c.use_host(16) and not c.use_disk(16)
    for _ in range(40):  # loads get slow: the estimate follows, the host tier goes unused
        c.observe((1.0, 10), (0.0, 0), (0.0, 0))
    assert not c.use_host(16)
