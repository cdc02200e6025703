"""GPT-OSS (attention sinks, alternating sliding-window and global layers, qkv/o biases, YaRN,
a biased top-k-softmax router over biased experts with a clamped SwiGLU) against
transformers: greedy tokens and logits through the runner and the engine (chunked prefill,
prefix cache across turns); its MXFP4 release format against transformers' dequantization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from test_hf_parity import (
    PROMPTS,
    assert_end_logits_match,
    check_engine_turns,
    hf_greedy,
    runner_for,
)

from agentspeed.engine.simple_generate import generate
from agentspeed.kernels import cpu_native
from agentspeed.modeling.layers.attention import PagedAttention
from agentspeed.sampling_params import SamplingParams

NEW = 16
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny("gpt_oss", tmp_path_factory.mktemp("gpt_oss"))
    # sinks large enough to matter beside these small attention logits
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    for name in tensors:
        if name.endswith("sinks"):
            tensors[name] = torch.linspace(-2.0, 2.0, tensors[name].numel())
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_layers_read_windows_and_sinks(gpt_oss: Path) -> None:
    runner = runner_for(gpt_oss, page_size=5)
    attn = [m for m in runner.model.modules() if isinstance(m, PagedAttention)]
    assert [a.window for a in attn] == [7, None]
    assert all(a.sinks is not None and a.sinks.abs().max() == 2.0 for a in attn)
    # windows and sinks keep the model's attention kernels (every CPU backend takes both)
    assert all(a.kernels.backends["paged_attention_prefill"] == runner.kernels.backends["paged_attention_prefill"]
               for a in attn)


def test_greedy_tokens_and_logits_match_transformers(gpt_oss: Path) -> None:
    runner = runner_for(gpt_oss, page_size=5)
    batched = generate(runner, PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, batched):
        ref_tokens, ref_logits = hf_greedy(gpt_oss, prompt, NEW)
        assert out.token_ids == ref_tokens
        assert generate(runner, [prompt], GREEDY)[0].token_ids == ref_tokens
        assert_end_logits_match(runner, prompt, ref_tokens, ref_logits, page_size=5)


def test_engine_chunked_prefill_and_prefix_cache(gpt_oss: Path) -> None:
    check_engine_turns(gpt_oss)


FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An x @ W expert tensor [E, K, R] as GPT-OSS stores it: blocks [E, R, K / 32, 16] (two
    e2m1 codes a byte, low nibble first) and e8m0 scales [E, R, K / 32]."""
    wt = w.transpose(1, 2)
    E, R, K = wt.shape
    g = wt.reshape(E, R, K // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    codes = ((g / torch.exp2(exp)[..., None])[..., None] - FP4).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def test_mxfp4_release_loads_as_transformers_dequantizes_it(gpt_oss: Path, tmp_path: Path) -> None:
    """Experts stored as MXFP4 blocks and scales (quant_method mxfp4) load to the logits of
    the same checkpoint dequantized by transformers' own converter (convert_moe_packed_tensors)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(str(gpt_oss / "model.safetensors"))
    packed, dequant = dict(tensors), dict(tensors)
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = to_mxfp4(t)
            del packed[name]
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            dequant[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            assert dequant[name].shape == t.shape
    cfg = json.loads((gpt_oss / "config.json").read_text())
    for d, data, extra in ((tmp_path / "mxfp4", packed, {"quantization_config": {"quant_method": "mxfp4"}}),
                           (tmp_path / "dequant", dequant, {})):
        d.mkdir()
        save_file(data, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
    runner = runner_for(tmp_path / "mxfp4", page_size=5)
    prompt = PROMPTS[1]
    ref_tokens, ref_logits = hf_greedy(tmp_path / "dequant", prompt, NEW)
    assert generate(runner, [prompt], GREEDY)[0].token_ids == ref_tokens
    assert_end_logits_match(runner, prompt, ref_tokens, ref_logits, page_size=5)


def test_gguf_matches_transformers(gpt_oss: Path, tmp_path: Path) -> None:
    """llama.cpp's gpt-oss layout (conversion/gpt_oss.py): gate and up experts apart and
    transposed to [experts, rows, cols], their biases split, a biased router, attn_sinks,
    post_attention_norm before the MLP, YaRN and the window in the metadata."""
    from gguf_writer import write_gguf

    runner = runner_for(write_gguf(gpt_oss, tmp_path / "gpt-oss-f32.gguf", "F32", "gpt-oss"), page_size=5)
    attn = [m for m in runner.model.modules() if isinstance(m, PagedAttention)]
    assert [a.window for a in attn] == [7, None] and all(a.sinks is not None for a in attn)
    for prompt in PROMPTS[:2]:
        ref_tokens, ref_logits = hf_greedy(gpt_oss, prompt, NEW)
        assert generate(runner, [prompt], GREEDY)[0].token_ids == ref_tokens
        assert_end_logits_match(runner, prompt, ref_tokens, ref_logits, page_size=5)


@pytest.mark.skipif(cpu_native._fn is None, reason=f"native kernels unavailable: {cpu_native._UNAVAILABLE}")
def test_mxfp4_gguf_stays_packed(gpt_oss: Path, tmp_path: Path) -> None:
    """An MXFP4 GGUF (llama.cpp's MXFP4_MOE files hold the experts so) is read packed, experts
    one packed weight each with their biases beside, and gives the greedy tokens of the same
    file dequantized and run dense."""
    from gguf_writer import write_gguf
    from test_qwen3_moe import fused_and_loop

    from agentspeed.config import KernelConfig
    from agentspeed.kernels.ggml import GgmlLinear
    from agentspeed.modeling.layers.moe import SparseMoE

    path = write_gguf(gpt_oss, tmp_path / "gpt-oss-mxfp4.gguf", "MXFP4", "gpt-oss")
    packed = runner_for(path, page_size=5)
    assert packed.kernels.widened == {}
    moes = [m for m in packed.model.modules() if isinstance(m, SparseMoE)]
    assert len(moes) == 2 and all(m.w13 is None and m.b13 is not None for m in moes)
    assert all(isinstance(w, GgmlLinear) for m in moes for w in [*(m._w13 or []), *(m._w2 or [])])
    dense = runner_for(path, page_size=5, kernels=KernelConfig.parse("linear=cpu"))
    ours, ref = generate(packed, PROMPTS, GREEDY), generate(dense, PROMPTS, GREEDY)
    assert [o.token_ids for o in ours] == [r.token_ids for r in ref]
    assert len({t for o in ours for t in o.token_ids}) > 3
    # Its routed experts take the fused native call (biases, clamped SwiGLU) at every step
    # size: the per-expert loop's sums, up to float order and an int16 step of h where the two
    # activations' last bits differ.
    assert all(m._fused is not None for m in moes)
    g = torch.Generator().manual_seed(0)
    for T, scale in ((1, 1.0), (5, 1.0), (40, 1.0), (300, 1.0), (40, 300.0)):  # the last beyond the clamp
        fused, loop, _ = fused_and_loop(moes[0], T, g, scale)
        torch.testing.assert_close(fused, loop, rtol=0, atol=1e-4 * float(loop.abs().max()), msg=lambda m, T=T, scale=scale: f"T={T}, x scale {scale}: {m}")
    x = torch.randn(40, 64, generator=g) * 300.0
    gate_up = packed.kernels.linear(x, moes[0]._w13[0], moes[0].b13[0])  # type: ignore[index]
    assert float(gate_up.abs().max()) > 2 * 7.0  # so the clamp at 7 took part above


def test_experts_must_load_whole_in_one_layout(gpt_oss: Path) -> None:
    """GPT-OSS's experts come as transformers' 3-D tensors or as GGUF's per-expert ones: either
    whole set loads; a set short of a tensor is named missing (the one closest to complete)."""
    model = runner_for(gpt_oss, page_size=5).model
    names = set(model.targets)
    hf = {n for n in names if n.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj"))}
    gguf = {n for n in names if (".experts." in n and n.split(".experts.")[1][0].isdigit())
            or n.endswith(("experts.gate_proj_bias", "experts.up_proj_bias"))}
    assert len(hf) == 2 * 3 and len(gguf) == 2 * (3 * 8 + 2)
    assert model.missing_weights(names - gguf) == [] and model.missing_weights(names - hf) == []
    short = "model.layers.1.mlp.experts.5.up_proj.weight"
    assert model.missing_weights(names - hf - {short}) == [short]
    assert model.missing_weights(names - hf - gguf) == sorted(hf)
