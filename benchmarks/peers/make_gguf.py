"""Real-shape GGUF files for benchmarks, quantized the way users' files are: random weights
of a released model's shape (normal, std 0.02, as transformers initializes them; norms 1,
biases 0) written as an F16 GGUF, then quantized by llama.cpp's own `llama-quantize` (from the
llama-cpp-python sdist; build it with `peer_llamacpp.py build`). Nothing is downloaded: the
tokenizer is the default model's (SmolLM2's GGUF metadata is copied), so the vocabulary is
49,152 rather than the original's. (llama.cpp's convert_hf_to_gguf.py refuses that tokenizer
re-saved by transformers: its pre-tokenizer hash is not in the script's list.)

    python benchmarks/peers/make_gguf.py --shape qwen2.5-1.5b --types Q4_K_M,Q8_0,Q6_K --out .cache/gguf
    python benchmarks/peers/make_gguf.py --shape gpt-oss-6l --types MXFP4_MOE --out .cache/gguf

Writes OUT/<shape>-<TYPE>.gguf (and keeps OUT/<shape>-F16.gguf).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from peer_llamacpp import tool

SHAPES = {
    # Qwen2.5-1.5B: 28 layers, hidden 1536, MLP 8960, 12 heads, 2 KV heads, tied embeddings.
    "qwen2.5-1.5b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768),
    # Qwen3-Coder-30B-A3B's layer (hidden 2048, 32 heads of 128, 4 KV heads, q/k norm, 128
    # experts of 768, top 8), 8 of its 48 layers so the F16 file (10 GiB) and the benchmark fit
    # this 24 GiB box.
    "qwen3-moe-8l": dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, intermediate_size=6144,
                         num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                         tie_word_embeddings=False, rope_theta=1e7, max_position_embeddings=32768),
    # GPT-OSS-20B's layer (hidden 2880, 64 heads of 64, 8 KV heads, qkv/o biases, sinks, a
    # 128-token window on every other layer, 32 biased experts of 2880, top 4, YaRN x32), 6 of
    # its 24 layers (the F16 file: 10 GiB). Quantize with MXFP4_MOE, as its releases ship.
    "gpt-oss-6l": dict(architectures=["GptOssForCausalLM"], hidden_size=2880, intermediate_size=2880,
                       num_hidden_layers=6, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                       num_experts=32, num_experts_per_tok=4, moe_intermediate_size=2880, sliding_window=128,
                       tie_word_embeddings=False, rope_theta=150000.0, max_position_embeddings=131072,
                       yarn=(32.0, 4096)),
}
_ARCH = {"Qwen2ForCausalLM": "qwen2", "Qwen3MoeForCausalLM": "qwen3moe", "GptOssForCausalLM": "gpt-oss"}


def write_f16(shape: str, path: Path) -> None:
    import gguf
    import numpy as np

    from agentspeed.model_source import default_model_path

    cfg = SHAPES[shape]
    src = gguf.GGUFReader(str(default_model_path()))
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    moe = "num_experts" in cfg
    gpt_oss = cfg["architectures"] == ["GptOssForCausalLM"]
    w = gguf.GGUFWriter(str(path), _ARCH[cfg["architectures"][0]])
    if gpt_oss:  # as llama.cpp's conversion/gpt_oss.py writes them
        w.add_sliding_window(cfg["sliding_window"])
        factor, orig = cfg["yarn"]
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(orig)
    w.add_name(f"random {shape}")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if moe:
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub)
    rng = np.random.default_rng(0)
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * hd
    kv = cfg["num_key_value_heads"] * hd

    def rand(*s: int) -> np.ndarray:
        return (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", rand(vocab, h))
    if not cfg["tie_word_embeddings"]:
        w.add_tensor("output.weight", rand(vocab, h))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        for name, shape_ in (("attn_q", (q, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)), ("attn_output", (h, q))):
            w.add_tensor(b + name + ".weight", rand(*shape_))
        if gpt_oss:  # biases, sinks, a biased F32 router, biased experts, the pre-MLP norm's name
            E, fe = cfg["num_experts"], cfg["moe_intermediate_size"]
            for name, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv), ("attn_output", h)):
                w.add_tensor(b + name + ".bias", np.zeros(n, np.float32))
            w.add_tensor(b + "attn_sinks.weight", np.zeros(cfg["num_attention_heads"], np.float32))
            w.add_tensor(b + "ffn_gate_inp.weight", rand(E, h).astype(np.float32))
            w.add_tensor(b + "ffn_gate_inp.bias", np.zeros(E, np.float32))
            for name, shape_ in (("ffn_gate_exps", (E, fe, h)), ("ffn_up_exps", (E, fe, h)),
                                 ("ffn_down_exps", (E, h, fe))):
                w.add_tensor(b + name + ".weight", rand(*shape_))
                w.add_tensor(b + name + ".bias", np.zeros(shape_[:2], np.float32))
            w.add_tensor(b + "attn_norm.weight", np.ones(h, np.float32))
            w.add_tensor(b + "post_attention_norm.weight", np.ones(h, np.float32))
            continue
        if moe:  # router (F32, as llama.cpp keeps it), experts stacked [E, rows, cols], q/k norms
            E, fe = cfg["num_experts"], cfg["moe_intermediate_size"]
            w.add_tensor(b + "ffn_gate_inp.weight", rand(E, h).astype(np.float32))
            for name, shape_ in (("ffn_gate_exps", (E, fe, h)), ("ffn_up_exps", (E, fe, h)),
                                 ("ffn_down_exps", (E, h, fe))):
                w.add_tensor(b + name + ".weight", rand(*shape_))
            w.add_tensor(b + "attn_q_norm.weight", np.ones(hd, np.float32))
            w.add_tensor(b + "attn_k_norm.weight", np.ones(hd, np.float32))
        else:
            for name, shape_ in (("ffn_gate", (f, h)), ("ffn_up", (f, h)), ("ffn_down", (h, f))):
                w.add_tensor(b + name + ".weight", rand(*shape_))
            for name, n in (("attn_q", h), ("attn_k", kv), ("attn_v", kv)):
                w.add_tensor(b + name + ".bias", np.zeros(n, np.float32))
        w.add_tensor(b + "attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(h, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--types", default="Q4_K_M,Q8_0,Q6_K", help="llama-quantize type names")
    ap.add_argument("--out", default=".cache/gguf")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not tool("llama-quantize").exists():
        sys.exit("llama-quantize is not built: run `python benchmarks/peers/peer_llamacpp.py build` first")
    f16 = out / f"{a.shape}-F16.gguf"
    if not f16.exists():
        t = time.perf_counter()
        write_f16(a.shape, f16)
        print(f"{f16}: {f16.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f}s", flush=True)
    for qtype in a.types.split(","):
        dst = out / f"{a.shape}-{qtype}.gguf"
        if not dst.exists():
            subprocess.run([str(tool("llama-quantize")), str(f16), str(dst), qtype], check=True)
        print(f"{dst}: {dst.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
