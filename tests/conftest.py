"""Shared fixtures: tiny random-weight checkpoints built with transformers, and the
embedded SmolLM2 GGUF."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


def make_tiny(kind: str, root: Path, **overrides: object) -> Path:
    """Save a random-weight tiny model of `kind` (llama|qwen2|qwen3|mistral) to root/kind."""
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[kind]
    kw = dict(TINY)
    if kind == "qwen3":
        kw["head_dim"] = 16
    if kind == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    torch.manual_seed(hash(kind) % 1000)
    model = AutoModelForCausalLM.from_config(cls(**kw), dtype=torch.float32)
    # Random init is tiny; widen it so logits are not all near-ties (greedy then is a
    # meaningful comparison).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and "norm" not in "".join(n for n, q in model.named_parameters() if q is p):
                p.normal_(0, 0.05)
    path = root / kind
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny(k, root) for k in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from agentspeed.modeling.loaders.source import default_model_path

    return default_model_path()
