"""FP8 safetensors checkpoints (loaders/checkpoint_quant.py): a tiny random model saved as
DeepSeek-V3-style block-scaled FP8 and as compressed-tensors FP8 loads to the logits of its
own dequantized weights, within FP8's error of the original; unsupported schemes and FP8
tensors without a config fail with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from agentspeed.control.plan import ScheduledChunk
from agentspeed.errors import ModelLoadError, UnsupportedModelError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Ragged blocks: 64- and 128-wide weights split 48 + 16, 32-row ones 24 + 8.
BLOCK = (24, 48)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 11, 30, 31, 32]


def quantize_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 weight, fp32 scale_inv [ceil(N/bn), ceil(K/bk)]): each block's scale
    maps its largest |w| to 448, and weight * scale_inv is its value, as DeepSeek stores it."""
    bn, bk = block
    n, k = w.shape
    sn, sk = -(-n // bn), -(-k // bk)
    padded = torch.zeros(sn * bn, sk * bk)
    padded[:n, :k] = w
    amax = padded.reshape(sn, bn, sk, bk).abs().amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    expanded = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return (w / expanded).to(torch.float8_e4m3fn), scale


def quantize_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w / scale).to(torch.float8_e4m3fn), scale.to(torch.bfloat16)


def is_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("proj.weight")


def save_quantized(src: Path, dst: Path, scheme: str) -> Path:
    """src's checkpoint with every layer projection stored FP8 (scheme "block" or "channel"),
    plus dst/../<dst>-dequant: the same FP8 values times their scales, in fp32 (the reference)."""
    tensors = load_file(str(src / "model.safetensors"))
    fp8: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not is_linear(name):
            fp8[name] = ref[name] = t
            continue
        if scheme == "block":
            q, s = quantize_block(t, BLOCK)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            expanded = s.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[: t.shape[0], : t.shape[1]]
            ref[name] = q.float() * expanded
        else:
            q, s = quantize_channel(t)
            fp8[name], fp8[name + "_scale"] = q, s
            ref[name] = q.float() * s.float()
    cfg = json.loads((src / "config.json").read_text())
    for out, data, quant in ((dst, fp8, quant_config(scheme)), (dst.with_name(dst.name + "-dequant"), ref, None)):
        out.mkdir()
        save_file(data, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps({**cfg, **({"quantization_config": quant} if quant else {})}))
    return dst


def quant_config(scheme: str) -> dict[str, Any]:
    if scheme == "block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(BLOCK)}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}


def logits(path: Path) -> torch.Tensor:
    from test_hf_parity import runner_for

    runner = runner_for(path, page_size=8)
    return runner.forward([ScheduledChunk("x", PROMPT, 0, [1, 2])])[0]


@pytest.mark.parametrize("kind, scheme", [("llama", "block"), ("llama", "channel"), ("deepseek_v3", "block")])
def test_fp8_checkpoint_loads_to_its_dequantized_logits(
        tiny_models: dict[str, Path], tmp_path: Path, kind: str, scheme: str) -> None:
    """The FP8 checkpoint's logits equal those of its FP8 values times their scales (computed
    here, independently), and are within FP8's rounding of the fp32 original; with the
    quantization_config removed, the FP8 tensors are refused (not cast raw, as they once were).
    DeepSeek-V3 as its FP8 release stores it: MLA and expert projections block-scaled."""
    from conftest import make_tiny

    src = tiny_models[kind] if kind in tiny_models else make_tiny(kind, tmp_path)
    path = save_quantized(src, tmp_path / f"fp8-{scheme}", scheme)
    got = logits(path)
    torch.testing.assert_close(got, logits(path.with_name(path.name + "-dequant")), rtol=1e-5, atol=1e-5)
    original = logits(src)
    # e4m3 moves these weights by 2.6% (relative L2, either scheme); this random 2-layer model
    # amplifies that about 3x into its logits (8.5% measured); a lost or misplaced scale is
    # off by orders of magnitude.
    err = ((got - original).norm() / original.norm()).item()
    print(f"FP8 {kind} {scheme}: logits off the fp32 original by {err:.4f} (relative L2)")
    assert 0 < err < 0.15
    raw = tmp_path / "raw"
    shutil.copytree(path, raw)
    cfg = json.loads((raw / "config.json").read_text())
    del cfg["quantization_config"]
    (raw / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"F8_E4M3 but config\.json has no quantization_config"):
        logits(raw)


def test_fp8_slices_dequantize_like_the_whole(tmp_path: Path) -> None:
    """Tensor-parallel reads (row and column slices cutting blocks) equal the slices of the
    whole dequantized weight."""
    from agentspeed.modeling.loaders.checkpoint_quant import dequantize

    w = torch.randn(70, 100)
    q, s = quantize_block(w, BLOCK)

    def read_q(rows: slice | None, cols: slice | None) -> torch.Tensor:
        return q[rows or slice(None)][:, cols or slice(None)]

    def read_s(rows: slice | None, cols: slice | None) -> torch.Tensor:
        return s

    whole = dequantize(read_q, read_s, (70, 100), BLOCK, None, None)
    for rows, cols in ((slice(35, 70), None), (None, slice(50, 100)), (slice(13, 61), slice(7, 93))):
        part = dequantize(read_q, read_s, (70, 100), BLOCK, rows, cols)
        torch.testing.assert_close(part, whole[rows or slice(None)][:, cols or slice(None)], rtol=0, atol=0)
    assert (whole - w).abs().max() <= w.abs().max() / 16  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("quant, needle", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq'"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
    ({"quant_method": "mxfp4"}, "mxfp4 outside GPT-OSS"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fp8 format 'e5m2'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "format 'pack-quantized'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "kv_cache_scheme": {"num_bits": 8},
      "config_groups": {}}, "kv_cache_scheme"),
    ({"quant_method": "compressed-tensors", "format": "naive-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}, "8-bit int"),
])
def test_unsupported_quantization_is_a_clear_error(
        tiny_models: dict[str, Path], tmp_path: Path, quant: dict[str, Any], needle: str) -> None:
    from test_loading import assert_one_line_error, cli

    bad = tmp_path / "quant"
    shutil.copytree(tiny_models["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    with pytest.raises(UnsupportedModelError, match="unsupported checkpoint quantization") as e:
        logits(bad)
    assert needle in str(e.value)
    if quant["quant_method"] == "awq":  # the CLI says it in one line
        assert_one_line_error(cli("generate", "hi", "--raw", "--model", str(bad)), "quant_method 'awq'")
