"""Hugging Face config.json -> ModelConfig, for the architectures we implement."""

from __future__ import annotations

from typing import Any

from agentspeed.config import MLAConfig, ModelConfig, MoEConfig, RopeScaling
from agentspeed.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "Gemma3ForCausalLM",
    "GptOssForCausalLM",
)
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


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
    if kind in ("yarn", "deepseek_yarn"):
        def opt(key: str) -> float | None:
            v = params.get(key)
            return float(v) if v is not None else None

        original = params.get("original_max_position_embeddings")
        factor = params.get("factor")
        if original is None or factor is None:
            raise UnsupportedModelError("yarn rope scaling needs factor and original_max_position_embeddings")
        return theta, RopeScaling(
            "yarn",
            float(factor),
            original_max_position_embeddings=int(original),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            mscale=opt("mscale"),
            mscale_all_dim=opt("mscale_all_dim"),
            attention_factor=opt("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )
    raise UnsupportedModelError(f"unsupported rope scaling type {kind!r}")


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A multimodal checkpoint's language model config (Gemma 3 4B-27B ship as
    Gemma3ForConditionalGeneration): served text-only, its vision tower not loaded."""
    if "Gemma3ForConditionalGeneration" in (cfg.get("architectures") or []):
        text = dict(cfg.get("text_config") or {})
        for key in ("eos_token_id", "bos_token_id", "tie_word_embeddings"):
            if text.get(key) is None and cfg.get(key) is not None:
                text[key] = cfg[key]
        return {"model_type": "gemma3_text", **text, "architectures": ["Gemma3ForCausalLM"]}
    return cfg


def model_config_from_hf(cfg: dict[str, Any], generation_cfg: dict[str, Any] | None = None) -> ModelConfig:
    cfg = text_config(cfg)
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"unsupported activation {act!r}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise UnsupportedModelError(f"{key} is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError("bidirectional attention is not supported")
    window, sliding = _sliding(cfg, arch)
    is_gemma = arch == "Gemma3ForCausalLM"
    local_theta = None
    if is_gemma:
        theta, scaling, local_theta = _gemma_rope(cfg)
    else:
        theta, scaling = _rope(cfg)
    pre_attn = cfg.get("query_pre_attn_scalar")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    is_qwen2 = arch == "Qwen2ForCausalLM"
    llama_bias = bool(cfg.get("attention_bias", False)) and arch in (
        "LlamaForCausalLM", "MistralForCausalLM", "GptOssForCausalLM")
    eos = _ids(cfg.get("eos_token_id")) + _ids((generation_cfg or {}).get("eos_token_id"))
    is_deepseek = arch.startswith("Deepseek")
    mla, moe = (_mla(cfg), _moe(cfg, arch)) if is_deepseek else (None, None)
    if arch == "Qwen3MoeForCausalLM":
        moe = _qwen3_moe(cfg)
    gpt_oss = arch == "GptOssForCausalLM"
    if gpt_oss:
        moe = gpt_oss_moe(cfg)
    if mla is not None:
        # Llama-style fields describe nothing real for MLA; keep them consistent.
        cfg = {**cfg, "num_key_value_heads": heads, "head_dim": mla.qk_head_dim}
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
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
        rope_scaling=scaling,
        mla=mla,
        moe=moe,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        hidden_act=_ACTIVATIONS[act],
        sliding_window=window,
        sliding_layers=sliding,
        rope_local_theta=local_theta,
        attn_scale=float(pre_attn) ** -0.5 if is_gemma and pre_attn else None,
        attention_sinks=gpt_oss,
    )


def _sliding(cfg: dict[str, Any], arch: str) -> tuple[int | None, tuple[bool, ...]]:
    """(window, which layers use it) from layer_types (transformers 5), Gemma 3's
    sliding_window_pattern, Qwen2's max_window_layers, or Mistral's every-layer window."""
    window = cfg.get("sliding_window")
    n = int(cfg["num_hidden_layers"])
    if not window or (arch != "Gemma3ForCausalLM" and window >= cfg.get("max_position_embeddings", 0)):
        return None, ()
    types = cfg.get("layer_types")
    if types:
        sliding = tuple(t == "sliding_attention" for t in types)
    elif arch == "Gemma3ForCausalLM":
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        sliding = tuple((i + 1) % pattern != 0 for i in range(n))
    elif arch == "MistralForCausalLM":
        sliding = (True,) * n
    elif cfg.get("use_sliding_window"):
        first = int(cfg.get("max_window_layers") or 0)
        sliding = tuple(i >= first for i in range(n))
    else:
        return None, ()
    if len(sliding) != n:
        raise UnsupportedModelError(f"layer_types has {len(sliding)} entries for {n} layers")
    return (int(window), sliding) if any(sliding) else (None, ())


def _gemma_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None, float]:
    """Gemma 3: (global theta, global scaling, sliding layers' theta), from per-layer-type
    rope_parameters (transformers 5) or rope_theta/rope_scaling/rope_local_base_freq."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:
        theta, scaling = _rope({"rope_parameters": params["full_attention"]})
        local = params.get("sliding_attention") or {}
        local_theta, local_scaling = _rope({"rope_parameters": local})
        if local_scaling is not None:
            raise UnsupportedModelError("rope scaling on sliding-window layers is not supported")
        return theta, scaling, local_theta
    theta, scaling = _rope(cfg)
    return theta, scaling, float(cfg.get("rope_local_base_freq", 10000.0))


def _mla(cfg: dict[str, Any]) -> MLAConfig:
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("DeepSeek attention biases are not supported")
    q_lora = cfg.get("q_lora_rank")
    return MLAConfig(
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        q_lora_rank=int(q_lora) if q_lora else None,
        qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
        qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
        v_head_dim=int(cfg["v_head_dim"]),
        # DeepSeek-V2 always rotates adjacent pairs; V3 configs say so explicitly.
        rope_interleave=bool(cfg.get("rope_interleave", True)),
    )


def _moe(cfg: dict[str, Any], arch: str) -> MoEConfig | None:
    experts = cfg.get("n_routed_experts")
    if not experts:
        return None
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("MLP biases are not supported for DeepSeek models")
    if int(cfg.get("moe_layer_freq", 1)) != 1:
        raise UnsupportedModelError("moe_layer_freq != 1 is not supported")
    v3 = arch == "DeepseekV3ForCausalLM"
    method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    if method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise UnsupportedModelError(f"unsupported MoE topk_method {method!r}")
    return MoEConfig(
        num_experts=int(experts),
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        num_shared=int(cfg.get("n_shared_experts") or 0),
        first_dense=int(cfg.get("first_k_dense_replace") or 0),
        scoring="sigmoid" if v3 else "softmax",
        topk_method="noaux_tc" if v3 else method,
        num_groups=int(cfg.get("n_group") or 1),
        topk_groups=int(cfg.get("topk_group") or 1),
        # transformers' V2 router never renormalises; V3 does when the config says so.
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)) if v3 else False,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
    )


def _qwen3_moe(cfg: dict[str, Any]) -> MoEConfig | None:
    """Softmax top-k over all experts, no shared experts; every decoder_sparse_step-th layer
    not in mlp_only_layers is MoE (transformers' rule). Released configs say num_experts;
    transformers 5 saves it as num_local_experts."""
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if not experts:
        return None
    return MoEConfig(
        num_experts=int(experts),
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        num_shared=0,
        first_dense=0,
        scoring="softmax",
        topk_method="greedy",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        dense_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )


def gpt_oss_moe(cfg: dict[str, Any]) -> MoEConfig:
    """Every layer MoE: top-k of the biased router's logits, softmaxed; biased experts with a
    clamped SwiGLU. Its MXFP4 releases are read by checkpoint_quant (or refused there)."""
    return MoEConfig(
        num_experts=int(cfg.get("num_local_experts") or cfg["num_experts"]),
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_shared=0,
        first_dense=0,
        scoring="topk_softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        router_bias=True,
        expert_bias=True,
        swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
    )
