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

pytestmark = pytest.mark.skipif(cpu_native._fn is None,
                                reason=f"native kernels unavailable: {cpu_native._UNAVAILABLE}")

PAGE = 4
# name -> (transformers kind, GGUF arch, GGUF type, config overrides)
MODELS = {
    "llama-q8_0": ("llama", "llama", "Q8_0", {}),  # int16 decode kernel
    "qwen2-q4_0-bias": ("qwen2", "qwen2", "Q4_0", {}),  # qkv bias
    # int8 decode kernel (K-quants, K a multiple of 256), per-head q/k norm
    "qwen3-q4_k": ("qwen3", "qwen3", "Q4_K", {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}),
    # attention natively, the routed experts by their module between runs of layers
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
@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_layers_equal_the_modules(ggufs: dict[str, Path], name: str, kv_dtype: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    r = runner(ggufs[name], kv_dtype)
    fused = r.model.fused_decode
    assert fused is not None
    assert fused.layers == r.model_config.num_layers
    assert len(fused.runs) == (r.model_config.num_layers if "moe" in name else 1)
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
    for step in range(5):
        rids = list(prompts)[: 1 + step % 3]  # 1, 2 and 3 sequences
        chunks = [ScheduledChunk(rid, (toks[rid],), pos[rid], pages[rid]) for rid in rids]
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
        for i, rid in enumerate(rids):
            pos[rid] += 1
            toks[rid] = int(logits[i].argmax())
    assert len(taken) == 5


def test_other_steps_and_models_keep_the_modules_path(ggufs: dict[str, Path], tmp_path: Path) -> None:
    path = ggufs["llama-q8_0"]
    r = runner(path, "fp8")  # fp8 rows are scaled per token: stored by the modules' path
    assert r.model.fused_decode is not None
    out = r.forward([ScheduledChunk("a", (1, 2, 3), 0, [1])])
    called = []
    r.model.fused_decode.forward = lambda *a: called.append(1)  # type: ignore[method-assign]
    r.forward([ScheduledChunk("a", (int(out[0].argmax()),), 3, [1])])
    assert not called
    # two new tokens of one sequence (drafts being verified): the modules' path
    r2 = runner(path)
    r2.model.fused_decode.forward = lambda *a: called.append(1)  # type: ignore[method-assign]
    r2.forward([ScheduledChunk("a", (1, 2, 3), 0, [1])])
    r2.forward([ScheduledChunk("a", (4, 5), 3, [1, 2])])
    assert not called
    # other linear backends, dense weights, sliding windows: no native layers
    assert runner(path, kernels=KernelConfig.parse("linear=cpu_native_exact")).model.fused_decode is None
    assert runner(path, kernels=KernelConfig.parse("rms_norm=reference")).model.fused_decode is None
    assert runner(make_tiny("llama", tmp_path)).model.fused_decode is None  # safetensors: dense fp32
    assert runner(make_tiny("gemma3", tmp_path)).model.fused_decode is None


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
