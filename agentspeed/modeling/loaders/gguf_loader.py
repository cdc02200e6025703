"""GGUF files (llama.cpp): architecture from metadata, tensor names mapped to Hugging Face
names, quantized tensors dequantized at load (by the `gguf` package)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agentspeed.config import ModelConfig, RopeScaling
from agentspeed.errors import ModelLoadError, UnsupportedModelError
from agentspeed.modeling.layers.weights import LazyTensor

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

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
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: Path) -> Any:
    """A GGUFReader, or a one-line ModelLoadError for a corrupt or truncated file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        # Touch every tensor's extent: a truncated file fails here, not mid-load.
        for t in reader.tensors:
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} is cut short")
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"corrupt or truncated GGUF file {path}: {e}") from None
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_model_config(reader: Any) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHS)}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError("GGUF rope frequency factors (rope_freqs) are not supported yet")

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    scaling = None
    if a("rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", float(a("rope.scaling.factor")))
    vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
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
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        rope_scaling=scaling,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's converter interleaves the two rotary halves of each q/k head
    # (for its GPT-J style rope); undo it to get Hugging Face's NeoX layout.
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def iter_gguf(reader: Any, cfg: ModelConfig) -> Iterator[tuple[str, LazyTensor]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    permute = cfg.architecture == "LlamaForCausalLM"
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            m = _LAYER_RE.match(t.name)
            if m is None or m.group(2) not in _LAYER_NAMES:
                continue
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
        n_head = None
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            n_head = cfg.num_heads
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            n_head = cfg.num_kv_heads
        shape = tuple(int(d) for d in reversed(t.shape))

        def reader_fn(
            rows: slice | None, cols: slice | None,
            t: Any = t, n_head: int | None = n_head, shape: tuple[int, ...] = shape,
        ) -> torch.Tensor:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = dequantize(t.data, t.tensor_type)
            w = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
            if n_head is not None:
                w = _unpermute(w, n_head)
            if rows is not None:
                w = w[rows]
            if cols is not None:
                w = w[:, cols]
            return w

        yield name, LazyTensor(shape, reader_fn)
