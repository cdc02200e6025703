"""fp8 (e4m3, one float32 scale per token), bfloat16 and float16 KV caches: per-element error bounded by e4m3's
precision, attention kernels agree with the reference on the quantized cache, and whole
models (MHA and MLA, and the real SmolLM2) stay close to the full-precision cache while
storing KV in a quarter of fp32's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from test_hf_parity import PROMPTS, runner_for
from test_kernels import make_paged

from agentspeed.config import CacheConfig, EngineConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.engine.simple_generate import generate
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.kernels import cpu, reference
from agentspeed.kernels.reference import FP8, dequantize, quantize_fp8
from agentspeed.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def test_quantize_roundtrip_error_is_within_e4m3_precision() -> None:
    x = torch.randn(64, 3, 16) * torch.logspace(-3, 2, 64)[:, None, None]  # rows of very different scale
    q, s = quantize_fp8(x, 2)
    assert q.dtype == FP8 and s.shape == (64,)
    back = dequantize(q, s, torch.float32)
    # 3 mantissa bits: relative error <= 2^-4 of the row's max for every element
    err = (back - x).abs().flatten(1).amax(1) / x.abs().flatten(1).amax(1)
    assert err.max() <= 2**-4
    assert (back - x).abs().mean() / x.abs().mean() < 0.04


def _store(cache: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if kind == "fp8":
        return quantize_fp8(cache, cache.dim() - 2)
    return cache.to(torch.bfloat16), None


@pytest.mark.parametrize("kind", ["fp8", "bfloat16"])
@pytest.mark.parametrize("decode_path", ["padded", "per-sequence"])
def test_cpu_attention_on_narrow_cache_matches_reference(
    decode_path: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if decode_path == "per-sequence":
        monkeypatch.setattr(cpu, "LONG_CONTEXT", 1)
    ctx = [37, 80, 5]
    q, k_cache, v_cache, meta, _, _ = make_paged(ctx, [1, 1, 1], page_size=8)
    kq, ks = _store(k_cache, kind)
    vq, vs = _store(v_cache, kind)
    ref = reference._paged_attention(q, kq, vq, meta, 0.25, ks, vs)
    got = cpu.paged_attention_decode(q, kq, vq, meta, 0.25, ks, vs)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and the narrow cache attends close to the full-precision one
    full = reference._paged_attention(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(ref, full, rtol=0.1, atol=0.1)
    pq, pk, pv, pmeta, _, _ = make_paged([*ctx, 400], [5, 9, 5, 30], page_size=8, seed=1)  # 400: split path
    pkq, pks = _store(pk, kind)
    pvq, pvs = _store(pv, kind)
    torch.testing.assert_close(
        cpu.paged_attention_prefill(pq, pkq, pvq, pmeta, 0.25, pks, pvs),
        reference._paged_attention(pq, pkq, pvq, pmeta, 0.25, pks, pvs), rtol=1e-5, atol=1e-5,
    )


def _teacher_forced(runner: ModelRunner, seq: list[int], n_prompt: int, page_size: int) -> torch.Tensor:
    """Logits after the prompt and after each later token of seq, fed one token per step
    (prefill, then the decode path over the paged cache): [len(seq) - n_prompt + 1, vocab]."""
    pages = list(range(1, 1 + -(-len(seq) // page_size)))
    out = [runner.forward([ScheduledChunk("x", seq[:n_prompt], 0, pages)])[0]]
    for i in range(n_prompt, len(seq)):
        out.append(runner.forward([ScheduledChunk("x", [seq[i]], i, pages)])[0])
    return torch.stack(out)


def _compare(path: Path, prompts: list[list[int]], page_size: int = 5, kv_dtype: str = "fp8") -> tuple[float, float]:
    """An fp8 (or 16-bit) cache vs the default cache along the default cache's greedy continuations:
    (largest logit difference in units of the logits' standard deviation, share of
    positions where both pick the same greedy token)."""
    kernels = None
    full = runner_for(path, page_size=page_size, kernels=kernels)
    fp8 = ModelRunner(EngineConfig(model=str(path), cache=CacheConfig(
        page_size=page_size, num_pages=64, kv_cache_dtype=kv_dtype), kernels=kernels))
    if kv_dtype == "fp8":
        assert fp8.kv.layers[0].k.dtype == FP8
        assert fp8.kv.bytes_per_token * 3.5 < full.kv.bytes_per_token  # ~4x smaller than fp32
    else:
        assert fp8.kv.layers[0].k.dtype == getattr(torch, kv_dtype)
        assert fp8.kv.bytes_per_token * 2 == full.kv.bytes_per_token
    worst, same, total = 0.0, 0, 0
    for p, out in zip(prompts, generate(full, prompts, GREEDY)):
        seq = p + out.token_ids
        a = _teacher_forced(full, seq, len(p), page_size)
        b = _teacher_forced(fp8, seq, len(p), page_size)
        worst = max(worst, ((a - b).abs().amax(-1) / a.std(-1)).max().item())
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return worst, same / total


# (kind, make_tiny overrides, bound on the worst logit difference in logit std units).
# Measured worst: llama 0.20, MLA dense 0.18, MLA + MoE 1.24: a perturbation can flip a
# token's expert choice (routing is discrete), which moves its logits further.
CASES = {
    "mha": ("llama", {}, 0.5),
    "mla": ("deepseek_v3", {"first_k_dense_replace": 3}, 0.5),
    "mla-moe": ("deepseek_v3", {}, 2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_cache_stays_close_to_full_precision(tmp_path: Path, case: str) -> None:
    kind, overrides, bound = CASES[case]
    path = make_tiny(kind, tmp_path, **overrides)
    worst, agree = _compare(path, PROMPTS)
    # Measured agreement 89-96%; the tiny random models' logits are nearly flat, so a few
    # near-ties flip.
    assert worst < bound, worst
    assert agree >= 0.85, agree


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_16bit_cache_stays_very_close(tmp_path: Path, case: str, kv_dtype: str) -> None:
    kind, overrides, _ = CASES[case]
    worst, agree = _compare(make_tiny(kind, tmp_path, **overrides), PROMPTS, kv_dtype=kv_dtype)
    # Measured: bfloat16 worst 0.011-0.021 std, agreement 99-100%; float16 (3 more mantissa
    # bits): worst 0.0016-0.0017 std, agreement 100%.
    assert worst < (0.1 if kv_dtype == "bfloat16" else 0.02), worst
    assert agree >= 0.95, agree


def test_fp8_cache_on_smollm2_keeps_greedy_text(smollm2_path: Path) -> None:
    from agentspeed.tokenizer import Tokenizer

    runner = runner_for(smollm2_path, page_size=16)
    tok = Tokenizer.load(runner.source)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
        tok.encode("def fibonacci(n):\n    "),
    ]
    worst, agree = _compare(smollm2_path, prompts, page_size=16)
    # Measured: worst 0.61 logit std, 98% of 50 greedy positions agree.
    assert worst < 1.0, worst
    assert agree >= 0.9, agree
    # bfloat16 (measured: 0.06 std, 100%)
    worst, agree = _compare(smollm2_path, prompts, page_size=16, kv_dtype="bfloat16")
    assert worst < 0.2, worst
    assert agree >= 0.95, agree
    # float16, llama.cpp's default KV type (measured: 0.006 std, 100%)
    worst, agree = _compare(smollm2_path, prompts, page_size=16, kv_dtype="float16")
    assert worst < 0.05, worst
    assert agree >= 0.95, agree
