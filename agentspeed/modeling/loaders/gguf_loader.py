"""GGUF files (llama.cpp): architecture from metadata, tensor names mapped to Hugging Face
names. The file is memory-mapped; 2-D tensors of the types the native kernels read
(kernels/ggml.NATIVE_TYPES) are handed out as packed views of it (GgmlWeight), never copied.
Other types are dequantized to fp32 here, and `widened_types` names them for the load log."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agentspeed.config import ModelConfig, MoEConfig, RopeScaling
from agentspeed.errors import ModelLoadError, UnsupportedModelError
from agentspeed.kernels.ggml import NATIVE_TYPES, GgmlWeight
from agentspeed.modeling.layers.weights import LazyTensor, dense
from agentspeed.modeling.loaders.gguf_file import GgufFile, TensorInfo
from agentspeed.modeling.loaders.hf_config import gpt_oss_moe

log = logging.getLogger(__name__)

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
          "qwen3moe": "Qwen3MoeForCausalLM", "gemma3": "Gemma3ForCausalLM", "gpt-oss": "GptOssForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
# Gemma 3 has norms after attention and MLP, and its ffn_norm is the pre-MLP one.
_GEMMA3_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# GPT-OSS (conversion/gpt_oss.py): the pre-MLP norm is post_attention_norm, a biased router,
# sinks (no .weight in transformers' name), expert biases stacked [experts, rows], gate and up
# apart (transformers interleaves them in one tensor).
_GPT_OSS_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.router",
                  "attn_sinks": "self_attn.sinks"}
_GPT_OSS_EXPERT_BIASES = {"ffn_gate_exps": "mlp.experts.gate_proj_bias", "ffn_up_exps": "mlp.experts.up_proj_bias",
                          "ffn_down_exps": "mlp.experts.down_proj_bias"}
# Stacked [experts, rows, cols] tensors -> one Hugging Face name per expert
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _expert_stack(m: re.Match[str] | None) -> bool:
    """Whether a layer tensor's name match is a stacked experts weight (not GPT-OSS's biases)."""
    return m is not None and m.group(2) in _EXPERT_NAMES and m.group(3) == "weight"


def open_gguf(path: Path) -> GgufFile:
    """The file's header and tensor directory, or a one-line ModelLoadError for a corrupt or
    truncated file (every tensor's extent is checked here, not mid-load)."""
    try:
        return GgufFile(path)
    except Exception as e:
        raise ModelLoadError(f"corrupt or truncated GGUF file {path}: {e}") from None


def _field(reader: GgufFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def gguf_model_config(reader: GgufFile) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHS)}"
        )
    names = {t.name for t in reader.tensors}

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    scaling = None
    kind = a("rope.scaling.type")
    gpt_oss = arch == "gpt-oss"
    if kind == "linear":
        scaling = RopeScaling("linear", float(a("rope.scaling.factor")))
    elif kind == "yarn":
        # GPT-OSS's YaRN keeps the correction range unrounded (transformers' truncate=False)
        scaling = RopeScaling("yarn", float(a("rope.scaling.factor")),
                              original_max_position_embeddings=int(a("rope.scaling.original_context_length")),
                              beta_fast=float(a("rope.scaling.yarn_beta_fast", 32.0)),
                              beta_slow=float(a("rope.scaling.yarn_beta_slow", 1.0)), truncate=not gpt_oss)
    elif kind not in (None, "none"):
        # Refuse rather than run with the wrong positions.
        raise UnsupportedModelError(f"unsupported GGUF rope scaling type {kind!r}")
    vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"])
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    extra = _gemma3(a, heads, hidden) if arch == "gemma3" else _gpt_oss(a) if gpt_oss else {}
    return ModelConfig(
        architecture=_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_layers=int(a("block_count")),
        num_heads=heads,
        num_kv_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("attention.key_length", hidden // heads)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        max_position_embeddings=int(a("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=arch == "qwen2" or gpt_oss,
        o_proj_bias=gpt_oss,
        qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),
        moe=_moe(a) if arch == "qwen3moe" else _gpt_oss_moe(a) if gpt_oss else None,
        rope_scaling=scaling,
        rope_freq_factors=_rope_freqs(reader),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        **extra,
    )


def _gemma3(a: Any, heads: int, hidden: int) -> dict[str, Any]:
    """Gemma 3's fields as llama.cpp reads them: a sliding-window pattern (every 6th layer
    global unless the file says otherwise), the sliding layers' RoPE base (10000 unless
    given), and the softmax scale (the 27B, 62 layers, scales by hidden / heads)."""
    n = int(a("block_count"))
    head_dim = int(a("attention.key_length", hidden // heads))
    out: dict[str, Any] = {
        "hidden_act": "gelu_tanh",
        "attn_scale": (hidden // heads if n == 62 else head_dim) ** -0.5,
        "rope_local_theta": float(a("rope.freq_base_swa", 10000.0)),
    }
    window = a("attention.sliding_window")
    if window:
        pattern = a("attention.sliding_window_pattern", 6)
        if np.ndim(pattern):  # one flag per layer
            sliding = tuple(bool(x) for x in pattern)
        else:  # a period: the last layer of each is global
            p = int(pattern)
            sliding = tuple(p == 0 or i % p < p - 1 for i in range(n))
        out.update(sliding_window=int(window), sliding_layers=sliding)
    return out


def _gpt_oss(a: Any) -> dict[str, Any]:
    """GPT-OSS's layers as llama.cpp builds them: sinks, and a window on every other layer
    from the first (its swa pattern of 2)."""
    n = int(a("block_count"))
    return {"attention_sinks": True, "sliding_window": int(a("attention.sliding_window")),
            "sliding_layers": tuple(i % 2 == 0 for i in range(n))}


def _gpt_oss_moe(a: Any) -> MoEConfig:
    # llama.cpp's gpt-oss graph is transformers' (its fixed SwiGLU alpha and limit are
    # transformers' defaults): the expert counts under transformers' keys.
    return gpt_oss_moe({"num_local_experts": a("expert_count"), "num_experts_per_tok": a("expert_used_count"),
                        "intermediate_size": a("expert_feed_forward_length")})


def _moe(a: Any) -> MoEConfig:
    # llama.cpp's qwen3moe graph always renormalises the top-k weights (as Qwen3-MoE
    # releases configure norm_topk_prob); newer files may say so in expert_weights_norm.
    return MoEConfig(
        num_experts=int(a("expert_count")),
        top_k=int(a("expert_used_count")),
        intermediate_size=int(a("expert_feed_forward_length")),
        num_shared=0,
        first_dense=0,
        scoring="softmax",
        topk_method="greedy",
        norm_topk_prob=bool(a("expert_weights_norm", True)),
    )


def _rope_freqs(reader: GgufFile) -> tuple[float, ...] | None:
    """The rope_freqs tensor (Llama 3.1+: llama.cpp's converter stores the llama3 scaling
    as one divisor per rotary frequency, and no rope.scaling.type)."""
    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    from gguf import GGMLQuantizationType

    if t.tensor_type != GGMLQuantizationType.F32:
        raise ModelLoadError(f"rope_freqs.weight is {GGMLQuantizationType(t.tensor_type).name}, expected F32")
    return tuple(float(x) for x in t.data.view(np.float32))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's converter interleaves the two rotary halves of each q/k head
    # (for its GPT-J style rope); undo it to get Hugging Face's NeoX layout.
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def widened_types(reader: GgufFile) -> dict[str, int]:
    """Quantized tensor types in this file without a native kernel -> how many tensors: these
    are dequantized to fp32 at load (4 bytes per weight)."""
    from gguf import GGMLQuantizationType

    out: dict[str, int] = {}
    for t in reader.tensors:
        if t.tensor_type not in NATIVE_TYPES and t.tensor_type != GGMLQuantizationType.F32:
            name = GGMLQuantizationType(t.tensor_type).name
            out[name] = out.get(name, 0) + 1
    return out


def _read(t: Any, shape: tuple[int, ...], n_head: int | None,
          rows: slice | None, cols: slice | None) -> torch.Tensor | GgmlWeight:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if len(shape) == 2 and t.tensor_type in NATIVE_TYPES:
        w = GgmlWeight.of(int(t.tensor_type), (shape[0], shape[1]), t.data)
        if n_head is not None:
            w = w.take_rows(_unpermute(torch.arange(shape[0]), n_head))
        if rows is not None:
            w = w.rows(*rows.indices(shape[0])[:2])
        if cols is None:
            return w
        start, stop = cols.indices(shape[1])[:2]
        if start % w.block == 0 and stop % w.block == 0:
            return w.cols(start, stop)
        # A tensor-parallel split inside a block (e.g. 8960 columns of Q4_K over 2 ranks):
        # this shard cannot stay packed.
        log.warning("%s: a %s shard of columns [%d, %d) is not whole %d-column blocks; dequantized to fp32",
                    t.name, w.name, start, stop, w.block)
        return w.dequantize()[:, start:stop].contiguous()
    if t.tensor_type == GGMLQuantizationType.F32:
        arr = t.data.view(np.float32)
    elif t.tensor_type == GGMLQuantizationType.F16:
        arr = t.data.view(np.float16)
    else:
        arr = dequantize(t.data, GGMLQuantizationType(t.tensor_type))
    out = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
    if n_head is not None:
        out = _unpermute(out, n_head)
    if rows is not None:
        out = out[rows]
    if cols is not None:
        out = out[:, cols]
    return out


def _experts(t: TensorInfo, layer: str) -> Iterator[tuple[str, LazyTensor]]:
    """A stacked expert tensor as one 2-D tensor per expert (views of the file)."""
    E = int(t.shape[2])
    shape = (int(t.shape[1]), int(t.shape[0]))
    per = t.n_bytes // E
    for e in range(E):
        sub = TensorInfo(f"{t.name}[{e}]", t.tensor_type, t.shape[:2], per, t.data[e * per: (e + 1) * per])

        def reader_fn(rows: slice | None, cols: slice | None, sub: TensorInfo = sub) -> torch.Tensor | GgmlWeight:
            return _read(sub, shape, None, rows, cols)

        m = _LAYER_RE.match(t.name)
        assert m is not None
        yield f"model.layers.{layer}.mlp.experts.{e}.{_EXPERT_NAMES[m.group(2)]}.weight", LazyTensor(shape, reader_fn)


def count_tensors(reader: GgufFile) -> int:
    """How many tensors iter_gguf yields at most (an expert stack counts once per expert)."""
    def n(t: TensorInfo) -> int:
        m = _LAYER_RE.match(t.name)
        return int(t.shape[2]) if _expert_stack(m) else 1

    return sum(n(t) for t in reader.tensors)


def iter_gguf(reader: GgufFile, cfg: ModelConfig) -> Iterator[tuple[str, LazyTensor]]:
    """(Hugging Face name, lazy tensor) with Hugging Face's layout and values: llama's q/k
    rows un-permuted, Gemma's norms back to w from llama.cpp's 1 + w."""
    permute = cfg.architecture == "LlamaForCausalLM"
    gemma = cfg.architecture == "Gemma3ForCausalLM"
    gpt_oss = cfg.architecture == "GptOssForCausalLM"
    layer_names = _GEMMA3_NAMES if gemma else _GPT_OSS_NAMES if gpt_oss else _LAYER_NAMES
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            m = _LAYER_RE.match(t.name)
            if _expert_stack(m):
                assert m is not None
                yield from _experts(t, m.group(1))
                continue
            if gpt_oss and m is not None and m.group(2) in _EXPERT_NAMES:
                name = f"model.layers.{m.group(1)}.{_GPT_OSS_EXPERT_BIASES[m.group(2)]}"
            elif m is None or m.group(2) not in layer_names:
                continue
            elif m.group(2) == "attn_sinks":
                name = f"model.layers.{m.group(1)}.self_attn.sinks"
            else:
                name = f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
        n_head = None
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            n_head = cfg.num_heads
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            n_head = cfg.num_kv_heads
        shape = tuple(int(d) for d in reversed(t.shape))
        shift = gemma and name.endswith("norm.weight")

        def reader_fn(rows: slice | None, cols: slice | None, t: Any = t, n_head: int | None = n_head,
                      shape: tuple[int, ...] = shape, shift: bool = shift) -> torch.Tensor | GgmlWeight:
            out = _read(t, shape, n_head, rows, cols)
            return dense(out, t.name) - 1.0 if shift else out

        yield name, LazyTensor(shape, reader_fn)
