"""A tiny transformers checkpoint written as the GGUF llama.cpp's convert_hf_to_gguf.py makes
of it: its tensor names (kept here, independently of the loader's table), llama's q/k row
permutation, Llama 3.1's rope scaling baked into a `rope_freqs` tensor, and MoE experts stacked
into one 3-D tensor per projection. Weights are stored in any ggml type (tests/ggml_quant.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
}
EXPERT = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
GEMMA3 = {**LAYER, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
          "post_feedforward_layernorm": "post_ffw_norm"}
GPT_OSS = {**LAYER, "post_attention_layernorm": "post_attention_norm", "mlp.router": "ffn_gate_inp"}


def gpt_oss_experts(name: str, t: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """conversion/gpt_oss.py on one of transformers' expert tensors: gate_up_proj [E, H, 2I]
    (x @ W, gate and up interleaved) -> ffn_gate_exps and ffn_up_exps [E, I, H]; down_proj
    [E, I, H] -> ffn_down_exps [E, H, I]; their biases split alike."""
    prefix = name.split(".mlp.")[0].replace("model.layers.", "blk.")
    what = name.rsplit(".", 1)[1]
    if what == "gate_up_proj":
        wt = t.swapaxes(-1, -2)
        return [(f"{prefix}.ffn_gate_exps.weight", wt[:, 0::2]), (f"{prefix}.ffn_up_exps.weight", wt[:, 1::2])]
    if what == "gate_up_proj_bias":
        return [(f"{prefix}.ffn_gate_exps.bias", t[:, 0::2]), (f"{prefix}.ffn_up_exps.bias", t[:, 1::2])]
    if what == "down_proj":
        return [(f"{prefix}.ffn_down_exps.weight", t.swapaxes(-1, -2))]
    assert what == "down_proj_bias", name
    return [(f"{prefix}.ffn_down_exps.bias", t)]


def iq4_nl(w: np.ndarray) -> np.ndarray:
    """Random IQ4_NL blocks (a type with no native kernel) of w's shape: fp16 scale, 16 bytes
    of 4-bit indices into a fixed table."""
    n, k = w.shape
    rng = np.random.default_rng(5)
    blocks = np.zeros((n * k // 32, 18), np.uint8)
    blocks[:, :2] = np.full(len(blocks), 0.004, np.float16).view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = rng.integers(0, 256, (len(blocks), 16), dtype=np.uint8)
    return blocks.reshape(n, -1)


def llama3_rope_factors(cfg: dict[str, Any]) -> np.ndarray:
    """The converter's rope_freqs for a llama3 rope: one divisor per rotary frequency."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    factor, lo, hi = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def _store(w: Any, name: str, t: np.ndarray, qtype: str) -> None:
    from ggml_quant import quantize
    from gguf import GGMLQuantizationType as T

    if t.ndim == 1 or qtype == "F32":
        w.add_tensor(name, t)
    elif qtype == "F16":
        w.add_tensor(name, t.astype(np.float16))
    else:
        q = quantize(t.reshape(-1, t.shape[-1]), qtype)
        w.add_tensor(name, q.reshape(*t.shape[:-1], q.shape[-1]), raw_dtype=T[qtype])


def write_gguf(hf_dir: Path, out: Path, qtype: str, arch: str, embed_iq4_nl: bool = False) -> Path:
    """The tiny transformers model at hf_dir as a GGUF file of llama.cpp architecture `arch`
    whose 2-D and 3-D weights are stored as `qtype` (norms and biases F32); with embed_iq4_nl,
    random IQ4_NL token embeddings."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    names = GEMMA3 if arch == "gemma3" else GPT_OSS if arch == "gpt-oss" else LAYER
    w = gguf.GGUFWriter(str(out), arch)
    if arch == "gemma3":  # as conversion/gemma.py: global RoPE base, the sliding one, the window
        local, rope = rope.get("sliding_attention") or {}, rope.get("full_attention") or {}
        w.add_rope_freq_base_swa(local.get("rope_theta", 10000.0))
        w.add_sliding_window(cfg["sliding_window"])
        types = cfg["layer_types"]
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
    if arch == "gpt-oss":  # as conversion/gpt_oss.py: the window, experts of intermediate_size, YaRN
        w.add_sliding_window(cfg["sliding_window"])
        cfg = {**cfg, "moe_intermediate_size": cfg["intermediate_size"]}
        if rope.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        w.add_expert_count(cfg.get("num_experts") or cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if not name.startswith("model.layers."):
            gname = GLOBAL[name]
            if arch == "gemma3" and name == "model.norm.weight":
                t = t + 1.0
        elif arch == "gpt-oss" and ".mlp.experts." in name:
            for gname, part in gpt_oss_experts(name, t):
                _store(w, gname, np.ascontiguousarray(part), qtype)
            continue
        elif arch == "gpt-oss" and name.endswith("self_attn.sinks"):
            w.add_tensor(name.replace("model.layers.", "blk.").replace(".self_attn.sinks", ".attn_sinks.weight"), t)
            continue
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module.startswith("mlp.experts."):
                e, proj = module.removeprefix("mlp.experts.").split(".")
                experts.setdefault((layer, proj), {})[int(e)] = t
                continue
            gname = f"blk.{layer}.{names[module]}.{param}"
            if arch == "gemma3" and module.endswith("norm"):
                t = t + 1.0  # llama.cpp stores Gemma's 1 + w
        n_head = heads if "q_proj" in name else kv_heads if "k_proj" in name else None
        if arch == "llama" and n_head is not None:
            t = t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if embed_iq4_nl and gname == "token_embd.weight":
            w.add_tensor(gname, iq4_nl(t), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        elif gname.endswith(("ffn_gate_inp.weight", "ffn_gate_inp.bias")):
            w.add_tensor(gname, t)  # llama.cpp keeps the router in F32
        else:
            _store(w, gname, t, qtype)
    for (layer, proj), by_expert in sorted(experts.items()):
        stack = np.stack([by_expert[e] for e in range(len(by_expert))])
        _store(w, f"blk.{layer}.{EXPERT[proj]}.weight", stack, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
