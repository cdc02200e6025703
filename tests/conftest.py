"""Shared fixtures: tiny random-weight checkpoints built with transformers, and the
embedded SmolLM2 GGUF."""

from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Device pinning: the suite runs on the CPU even on a machine with a GPU (CUDA hidden
    from this process and every server it starts) unless GPU tests were asked for with
    `-m gpu`. Set before any test touches CUDA (torch initialises it lazily)."""
    if "gpu" not in (config.getoption("-m") or "").replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors under the interpreter in these tests; triton reads this
# once, at its import, so it is set before anything can import it.
os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


# DeepSeek-style: MLA with odd-sized dims (latent 32, rope 16, nope 24, v 20), 8 routed
# experts in 4 groups (2 chosen), 1 shared expert, first layer dense.
TINY_DEEPSEEK = dict(
    TINY,
    num_hidden_layers=3,
    num_key_value_heads=4,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=16,
    qk_nope_head_dim=24,
    v_head_dim=20,
    moe_intermediate_size=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
)


def make_tiny(kind: str, root: Path, **overrides: object) -> Path:
    """Save a random-weight tiny model of `kind` (llama|qwen2|qwen3|qwen3_moe|gemma3|gpt_oss|
    mistral|deepseek_v2|deepseek_v3) to root/kind."""
    from transformers import (
        AutoModelForCausalLM,
        DeepseekV2Config,
        DeepseekV3Config,
        Gemma3TextConfig,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
           "deepseek_v2": DeepseekV2Config, "deepseek_v3": DeepseekV3Config, "qwen3_moe": Qwen3MoeConfig, "gemma3": Gemma3TextConfig,
           "gpt_oss": GptOssConfig}[kind]
    kw = dict(TINY_DEEPSEEK) if kind.startswith("deepseek") else dict(TINY)
    if kind in ("qwen3", "qwen3_moe"):
        kw["head_dim"] = 16
    if kind == "gemma3":  # sliding layer, global layer; an 11-token window; own RoPE bases
        kw.update(head_dim=16, sliding_window=11, layer_types=["sliding_attention", "full_attention"],
                  query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                      "rope_theta": 1000000.0}})
    if kind == "gpt_oss":  # sliding (7 tokens) then global layer, sinks, 8 biased experts of 32, top 2
        kw.update(head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                  sliding_window=7, layer_types=["sliding_attention", "full_attention"])
    if kind == "qwen3_moe":  # 8 experts of 32, top 2, renormalised (as Qwen3-Coder-30B-A3B)
        kw.update(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    if kind == "mistral":
        kw["sliding_window"] = None
    if kind == "deepseek_v2":
        kw.update(topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    kw.update(overrides)
    # crc32, not hash(): str hashes change per process, and so would the models.
    torch.manual_seed(zlib.crc32(kind.encode()) % 1000)
    model = AutoModelForCausalLM.from_config(cls(**kw), dtype=torch.float32)
    # Random init is tiny; widen it so logits are not all near-ties (greedy then is a
    # meaningful comparison).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and "norm" not in "".join(n for n, q in model.named_parameters() if q is p):
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # exercise the biased expert choice
                b.normal_(0, 0.1)
    path = root / kind
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny(k, root) for k in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from agentspeed.model_source import default_model_path

    return default_model_path()
