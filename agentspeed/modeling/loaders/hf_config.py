"""Hugging Face config.json -> ModelConfig, for the architectures we implement."""

from __future__ import annotations

from typing import Any

from agentspeed.config import ModelConfig, RopeScaling
from agentspeed.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 nests theta and scaling in rope_parameters; older files use
    # rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params.get("low_freq_factor", 1.0)),
            float(params.get("high_freq_factor", 4.0)),
            int(params.get("original_max_position_embeddings", 8192)),
        )
    raise UnsupportedModelError(f"unsupported rope scaling type {kind!r}")


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def model_config_from_hf(cfg: dict[str, Any], generation_cfg: dict[str, Any] | None = None) -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"unsupported activation {cfg['hidden_act']!r}")
    window = cfg.get("sliding_window")
    windowed = cfg.get("use_sliding_window") or arch == "MistralForCausalLM"
    # Refuse rather than silently attend beyond the window.
    if windowed and window and window < cfg.get("max_position_embeddings", 0):
        raise UnsupportedModelError("sliding-window attention is not supported yet")
    theta, scaling = _rope(cfg)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    is_qwen2 = arch == "Qwen2ForCausalLM"
    llama_bias = bool(cfg.get("attention_bias", False)) and arch in ("LlamaForCausalLM", "MistralForCausalLM")
    eos = _ids(cfg.get("eos_token_id")) + _ids((generation_cfg or {}).get("eos_token_id"))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=is_qwen2 or llama_bias,
        o_proj_bias=llama_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        rope_scaling=scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )
