"""Qwen3-MoE (the Qwen3-Coder-30B-A3B family) against transformers: greedy tokens identical
and logits within tolerance from safetensors and from a GGUF (experts stacked as llama.cpp
writes them, kept packed when quantized), and through the full engine (chunked prefill,
prefix-cache hit on a second turn)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from gguf_writer import write_gguf
from test_hf_parity import (
    PROMPTS,
    assert_end_logits_match,
    check_engine_turns,
    hf_greedy,
    runner_for,
)

from agentspeed.config import KernelConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.engine.simple_generate import generate
from agentspeed.kernels import cpu_native
from agentspeed.kernels.ggml import GgmlLinear
from agentspeed.modeling.layers.moe import SparseMoE
from agentspeed.sampling_params import SamplingParams

NEW = 16
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
VARIANTS: dict[str, dict[str, object]] = {
    "renormalised": {},
    "raw-topk": {"norm_topk_prob": False},
    # 4 layers: 1 and 3 MoE by decoder_sparse_step 2, but 3 is listed as dense
    "sparse-step": {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen3_moe")
    return {name: make_tiny("qwen3_moe", root / name, **kw) for name, kw in VARIANTS.items()}


def moe_layers(runner: object) -> list[int]:
    targets = runner.model.targets  # type: ignore[attr-defined]
    return sorted({int(n.split(".")[2]) for n, (mod, _, _) in targets.items() if isinstance(mod, SparseMoE)})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_and_logits_match_transformers(models: dict[str, Path], variant: str) -> None:
    path = models[variant]
    runner = runner_for(path, page_size=5)
    assert moe_layers(runner) == ([1] if variant == "sparse-step" else [0, 1])
    batched = generate(runner, PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, batched):
        ref_tokens, ref_logits = hf_greedy(path, prompt, NEW)
        assert out.token_ids == ref_tokens
        assert generate(runner, [prompt], GREEDY)[0].token_ids == ref_tokens
        assert_end_logits_match(runner, prompt, ref_tokens, ref_logits, page_size=5)


def test_f32_gguf_matches_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp's qwen3moe layout: router ffn_gate_inp, experts as ffn_{gate,up,down}_exps
    stacks of [experts, rows, cols]."""
    hf = models["renormalised"]
    runner = runner_for(write_gguf(hf, tmp_path / "moe-f32.gguf", "F32", "qwen3moe"), page_size=7)
    assert moe_layers(runner) == [0, 1]
    for prompt in PROMPTS[:2]:
        ref_tokens, ref_logits = hf_greedy(hf, prompt, NEW)
        assert generate(runner, [prompt], GREEDY)[0].token_ids == ref_tokens
        assert_end_logits_match(runner, prompt, ref_tokens, ref_logits, page_size=7)


@pytest.mark.skipif(cpu_native._fn is None, reason=f"native kernels unavailable: {cpu_native._UNAVAILABLE}")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_quantized_gguf_experts_stay_packed(tmp_path: Path, qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Experts of a quantized GGUF are read packed (one GgmlLinear per expert projection, no
    dense copy) and give the greedy tokens of the same file dequantized and run dense (Q4_K
    with int16 activations, cpu_native_int16: the default int8 rounding of K-quant decode
    steps, llama.cpp's, flips near-tied tokens of this random model; its products are held to
    their bound in tests/test_ggml.py, and the fused call to the loop below)."""
    hf = make_tiny("qwen3_moe", tmp_path, hidden_size=256, moe_intermediate_size=256, intermediate_size=512,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    path = write_gguf(hf, tmp_path / f"moe-{qtype}.gguf", qtype, "qwen3moe")
    packed = runner_for(path)
    assert packed.kernels.widened == {}
    moes = [m for m in packed.model.modules() if isinstance(m, SparseMoE)]
    assert len(moes) == 2 and all(m.w13 is None and m.w2 is None for m in moes)
    assert all(isinstance(w, GgmlLinear) for m in moes for w in [*(m._w13 or []), *(m._w2 or [])])
    dense = runner_for(path, kernels=KernelConfig.parse("linear=cpu"))
    # per layer: qkv, o, and 8 experts x (gate|up, down); the embedding and the untied head
    assert sum(n for n, _ in dense.kernels.widened.values()) == 2 * (2 + 8 * 2) + 2
    int8 = qtype == "Q4_K"
    same_rounding = runner_for(path, kernels=KernelConfig.parse("linear=cpu_native_int16")) if int8 else packed
    ours = generate(same_rounding, PROMPTS, GREEDY)
    ref = generate(dense, PROMPTS, GREEDY)
    assert [o.token_ids for o in ours] == [r.token_ids for r in ref]
    assert len({t for o in ours for t in o.token_ids}) > 3
    chunk = [ScheduledChunk("x", PROMPTS[1], 0, [1, 2, 3])]
    want = dense.forward(chunk)
    assert (same_rounding.forward(chunk) - want).abs().max() < 1e-2 * want.std()
    # Steps of any size take the fused routed-experts call: the per-expert loop's sums, each
    # product rounding x as the loop's linear() call for that expert's row count does (int8
    # decode rows, 8-row chunks, the many-row int8 kernel; exact fp32 above 8 rows for Q8_0),
    # in one native call: equal up to the order of float sums (measured <= 5e-7 of outputs up to 8).
    from agentspeed.kernels import cpu_ggml

    moe = moes[0]
    assert moe._fused is not None
    # Measured on the AVX2 build (ggml_gemm_k8): <= 5e-7 of the outputs. On an AVX-512 box
    # (2026-12-03, the earlier fused call) the two differed by the int16 rounding level at 8
    # tokens (6.5e-5 absolute, 1e-3 relative), not explained there: that build is held to it.
    same = 1e-5 if cpu_ggml.MANY_INT8 == "k8" else 2e-3
    g = torch.Generator().manual_seed(0)
    for T, blocks in ((1, None), (3, None), (8, None), (20, None), (64, None), (300, None), (1300, None), (1300, 97)):
        if blocks:  # hold the per-choice outputs of `blocks` tokens at a time
            monkeypatch.setattr(cpu_ggml, "MOE_OUT_BYTES", blocks * 2 * 256 * 4)
        fused, loop, ids = fused_and_loop(moe, T, g)
        monkeypatch.undo()
        if T == 1300:  # experts with over 256 rows: more than one work item each
            assert int(torch.bincount(ids.flatten()).min()) > 256
        scale = float(loop.abs().max())
        if blocks is None:  # every product in the loop's regime: the same up to float order
            torch.testing.assert_close(fused, loop, rtol=0, atol=same * scale)
        else:
            # Blocks of 97 tokens give some experts few rows: Q4_K's 8-row decode calls where
            # the loop ran the many-row kernel (the same int8 rounding of x, other float sums,
            # so a rare h code lands one int8 step away: measured 8.7e-3 of outputs up to 7.9),
            # Q8_0's int16 decode rows where the loop's products were exact fp32.
            diff = (fused - loop).abs()
            assert float(diff.max()) < 5e-3 * scale and float(diff.mean()) < same * scale
    # The call's other roundings: int16 throughout (cpu_native_int16), and mode auto on a build
    # without a many-row int8 kernel (exact fp32 products above 8 rows, as linear() there).
    int16 = same_rounding if int8 else runner_for(path, kernels=KernelConfig.parse("linear=cpu_native_int16"))
    moe16 = next(m for m in int16.model.modules() if isinstance(m, SparseMoE))
    no_many = {"_MOE_MODE": 3, "MANY_INT8": None}
    for case, m in (("int16", moe16), ("no many-row int8 kernel", moe)):
        for T in (3, 20, 300):
            caches = [lin.call_cache for lin in [*m._w13, *m._w2]]
            if case != "int16":
                for name, value in no_many.items():
                    monkeypatch.setattr(cpu_ggml, name, value)
                for c in caches:  # linear()'s per-weight choices, made again without the kernel
                    c.clear()
            fused, loop, _ = fused_and_loop(m, T, g)
            monkeypatch.undo()
            for c in caches:
                c.clear()
            torch.testing.assert_close(fused, loop, rtol=0, atol=same * float(loop.abs().max()), msg=f"{case}, T={T}")


def fused_and_loop(moe: SparseMoE, T: int, g: torch.Generator,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's routed experts for T random tokens (normal, times scale) and routes: by the
    fused call and by the per-expert loop."""
    E, k = moe.cfg.num_experts, moe.cfg.top_k
    x = torch.randn(T, moe.gate.shape[1], generator=g) * scale
    w, ids = torch.rand(T, k, generator=g), torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    fused = moe._experts(x, w, ids)
    fn, moe._fused = moe._fused, None
    try:
        loop = moe._experts(x, w, ids)
    finally:
        moe._fused = fn
    return fused, loop, ids


def test_engine_chunked_prefill_and_prefix_cache(models: dict[str, Path]) -> None:
    check_engine_turns(models["renormalised"])


def test_router_weights_follow_transformers_rule() -> None:
    """softmax over all experts, top-k, renormalised only with norm_topk_prob."""
    from agentspeed.config import MoEConfig
    from agentspeed.modeling.layers.moe import route

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for norm in (True, False):
        cfg = MoEConfig(4, 2, 8, 0, 0, scoring="softmax", topk_method="greedy", norm_topk_prob=norm)
        w, ids = route(logits, None, cfg)
        p = logits.softmax(-1)[0, :2]
        assert sorted(ids[0].tolist()) == [0, 1]
        want = p / p.sum() if norm else p
        torch.testing.assert_close(w[0].sort(descending=True).values, want)
