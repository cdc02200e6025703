"""Decode steps through the native layer loop (kernels/cpu_decode.py, modeling/fused_decode.py)
compute what the modules compute, bit for bit: logits and every K/V row stored, for one and
several sequences, every cache type it stores, dense and routed-expert MLPs, q/k norms and
qkv biases, both integer decode kernels (int8 for K-quants, int16 for the others). Models it
cannot run keep the modules' path; native store_kv equals the reference's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from gguf_writer import write_gguf

from agentspeed.config import CacheConfig, EngineConfig, KernelConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.kernels import cpu_native, reference
from agentspeed.modeling import fused_decode
from agentspeed.modeling.layers.moe import SparseMoE

if cpu_native._fn is not None:
    from agentspeed.kernels import cpu_decode

pytestmark = pytest.mark.skipif(cpu_native._fn is None,
                                reason=f"native kernels unavailable: {cpu_native._UNAVAILABLE}")

PAGE = 4
# name -> (transformers kind, GGUF arch, GGUF type, config overrides)
MODELS = {
    "llama-q8_0": ("llama", "llama", "Q8_0", {}),  # int16 decode kernel
    "qwen2-q4_0-bias": ("qwen2", "qwen2", "Q4_0", {}),  # qkv bias
    # int8 decode kernel (K-quants, K a multiple of 256), per-head q/k norm
    "qwen3-q4_k": ("qwen3", "qwen3", "Q4_K", {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}),
    # routed experts behind Qwen3-MoE's routing (computed natively: equal up to float rounding)
    "qwen3moe-q4_k": ("qwen3_moe", "qwen3moe", "Q4_K", {"hidden_size": 256, "head_dim": 64,
                                                        "moe_intermediate_size": 256, "num_hidden_layers": 3}),
}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cpu_decode")
    out = {}
    for name, (kind, arch, qtype, kw) in MODELS.items():
        hf = make_tiny(kind, root / f"{name}_hf", **kw)
        out[name] = write_gguf(hf, root / f"{name}.gguf", qtype, arch)
    return out


def runner(path: Path, kv_dtype: str = "auto", **kw: object) -> ModelRunner:
    cache = CacheConfig(page_size=PAGE, num_pages=40, kv_cache_dtype=kv_dtype)
    return ModelRunner(EngineConfig(model=str(path), cache=cache, **kw))  # type: ignore[arg-type]


def caches(r: ModelRunner) -> list[torch.Tensor]:
    return [t for kv in r.kv.layers for t in (kv.k, kv.v)]


@pytest.mark.parametrize("kv_dtype", ["auto", "bfloat16", "float16"])
@pytest.mark.parametrize("name", [*sorted(MODELS), "qwen3moe-q4_k-module-experts"])
def test_native_layers_equal_the_modules(ggufs: dict[str, Path], name: str, kv_dtype: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The same logits and K/V rows bit for bit: dense layers; routed experts natively (the
    modules routing as the loop does: torch's router product rounds differently, ~1e-7, and
    the experts' int8 rounding of x can turn that into a code one step away, which flips
    near-tied greedy tokens of these random models); the module's experts between runs of
    native layers (as for routings the loop does not compute)."""
    module_experts = name.endswith("-module-experts")
    if module_experts:
        monkeypatch.setattr(fused_decode, "_qwen3_experts", lambda *a: None)
    elif "moe" in name:  # the modules route as the native loop does (tested against torch's below)
        def forward(self: SparseMoE, x: torch.Tensor, ctx: object = None) -> torch.Tensor:
            c = self.cfg
            weights, ids = cpu_decode.route(self.gate, x, c.top_k, c.norm_topk_prob, c.routed_scaling_factor)
            return self._experts(x, weights, ids)

        monkeypatch.setattr(SparseMoE, "forward", forward)
    r = runner(ggufs[name.removesuffix("-module-experts")], kv_dtype)
    fused = r.model.fused_decode
    assert fused is not None
    assert fused.layers == r.model_config.num_layers
    assert len(fused.runs) == (r.model_config.num_layers if module_experts else 1)
    taken = []
    native = fused.forward
    monkeypatch.setattr(fused, "forward", lambda ids, ctx: taken.append(1) or native(ids, ctx))
    # three sequences of different lengths, each on its own pages
    prompts = {"a": [5, 17, 33, 2, 9], "b": [40, 3, 3, 71, 8, 12, 60, 1, 4], "c": [11, 90]}
    pages = {rid: list(range(1 + 10 * i, 11 + 10 * i)) for i, rid in enumerate(prompts)}
    logits = r.forward([ScheduledChunk(rid, tuple(p), 0, pages[rid]) for rid, p in prompts.items()])
    assert not taken  # a prefill step keeps the modules' path
    pos = {rid: len(p) for rid, p in prompts.items()}
    toks = {rid: int(logits[i].argmax()) for i, rid in enumerate(prompts)}
    for step in range(6):
        rids = list(prompts)[: 1 + step % 3]  # 1, 2 and 3 sequences
        # steps 4 and 5: drafts being verified (3 tokens of "a", then 2 of "a" and 3 of "b")
        drafts = {4: {"a": (7, 7)}, 5: {"a": (3,), "b": (9, 1)}}.get(step, {})
        new = {rid: (toks[rid], *drafts.get(rid, ())) for rid in rids}
        chunks = [ScheduledChunk(rid, new[rid], pos[rid], pages[rid]) for rid in rids]
        before = [t.clone() for t in caches(r)]
        logits = r.forward(chunks)
        after = [t.clone() for t in caches(r)]
        for t, b in zip(caches(r), before):
            t.copy_(b)
        r.model.fused_decode = None
        want = r.forward(chunks)
        r.model.fused_decode = fused
        assert torch.equal(logits, want), f"step {step}: {(logits - want).abs().max()}"
        assert all(torch.equal(a, b) for a, b in zip(after, caches(r)))
        assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the step stored its rows
        for i, rid in enumerate(rids):  # (logits of each chunk's last token)
            pos[rid] += len(new[rid])
            toks[rid] = int(logits[i].argmax())
    assert len(taken) == 6


def test_other_steps_and_models_keep_the_modules_path(ggufs: dict[str, Path], tmp_path: Path) -> None:
    path = ggufs["llama-q8_0"]
    r = runner(path, "fp8")  # fp8 rows are scaled per token: stored by the modules' path
    assert r.model.fused_decode is not None
    out = r.forward([ScheduledChunk("a", (1, 2, 3), 0, [1])])
    called = []
    r.model.fused_decode.forward = lambda *a: called.append(1)  # type: ignore[method-assign]
    r.forward([ScheduledChunk("a", (int(out[0].argmax()),), 3, [1])])
    assert not called
    # more than 8 token rows, or a prompt's chunk beside a decode: the modules' path
    r2 = runner(path)
    r2.model.fused_decode.forward = lambda *a: called.append(1)  # type: ignore[method-assign]
    r2.forward([ScheduledChunk(rid, (1, 2, 3), 0, [1 + i]) for i, rid in enumerate("abc")])
    r2.forward([ScheduledChunk(rid, (4, 5, 6), 3, [1 + i, 4 + i]) for i, rid in enumerate("abc")])
    r2.forward([ScheduledChunk("a", (7,), 6, [1, 4]), ScheduledChunk("d", tuple(range(9, 29)), 0, [7, 8, 9, 10, 11])])
    assert not called
    # other linear backends, dense weights, sliding windows: no native layers
    assert runner(path, kernels=KernelConfig.parse("linear=cpu_native_exact")).model.fused_decode is None
    assert runner(path, kernels=KernelConfig.parse("rms_norm=reference")).model.fused_decode is None
    assert runner(make_tiny("llama", tmp_path)).model.fused_decode is None  # safetensors: dense fp32
    assert runner(make_tiny("gemma3", tmp_path)).model.fused_decode is None


@pytest.mark.parametrize("renorm", [True, False])
def test_native_routing_equals_torch(renorm: bool) -> None:
    """Qwen3-MoE's routing (modeling/layers/moe.py's route): the same experts, weights within
    float rounding, for batches of one to eight tokens."""
    from agentspeed.config import MoEConfig
    from agentspeed.modeling.layers.moe import route

    g = torch.Generator().manual_seed(int(renorm))
    cfg = MoEConfig(num_experts=128, top_k=8, intermediate_size=64, num_shared=0, first_dense=0,
                    scoring="softmax", topk_method="greedy", norm_topk_prob=renorm, routed_scaling_factor=2.5)
    router = torch.randn(128, 512, generator=g) * 0.05
    for R in (1, 3, 8):
        h = torch.randn(R, 512, generator=g)
        w, ids = cpu_decode.route(router, h, 8, renorm, 2.5)
        want_w, want_ids = route(torch.nn.functional.linear(h, router), None, cfg)
        order = want_ids.sort(-1).indices
        got_order = ids.long().sort(-1).indices
        assert torch.equal(ids.long().gather(1, got_order), want_ids.gather(1, order))
        torch.testing.assert_close(w.gather(1, got_order), want_w.gather(1, order), rtol=1e-5, atol=1e-7)
        assert bool((w[:, :-1] >= w[:, 1:]).all())  # largest first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_store_kv_equals_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 6 * 16, generator=g) * 300  # beyond bf16's and fp16's exact range
    qkv[0, 5] = 1e-6  # an fp16 subnormal
    k, v = qkv[:, 4 * 16:5 * 16].view(3, 1, 16), qkv[:, 5 * 16:].view(3, 1, 16)  # strided views
    slots = torch.tensor([5, 6, 13])
    got = [torch.zeros(4, 4, 1, 16, dtype=dtype) for _ in range(2)]
    want = [torch.zeros(4, 4, 1, 16, dtype=dtype) for _ in range(2)]
    cpu_native.store_kv(k, v, *got, slots)
    reference.store_kv(k, v, *want, slots)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].view(-1, 16)[13].float().abs().sum() > 0
    with pytest.raises(IndexError, match="outside"):
        cpu_native.store_kv(k, v, *got, torch.tensor([5, 6, 16]))
