"""What every decoder-only model shares: embedding -> layers -> norm as one placement Chain,
a (possibly tied) LM head, one RoPE table, and the checkpoint-name -> parameter table the
loaders fill."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from agentspeed.config import ModelConfig
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import Chain, Insertion, SpmdModule, compile_placements
from agentspeed.modeling.context import ForwardContext
from agentspeed.modeling.layers.basic import RMSNorm, Scale
from agentspeed.modeling.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from agentspeed.modeling.layers.rotary import cos_sin_table
from agentspeed.modeling.placement import Replicate

if TYPE_CHECKING:
    from agentspeed.modeling.fused_decode import FusedDecode

# target key -> (module, parameter name, part)
Targets = dict[str, tuple[SpmdModule, str, str | None]]


class CausalLM(nn.Module):
    """forward(input_ids [T], ctx) -> fp32 logits [len(ctx.logits_indices), vocab_size],
    replicated on every rank. Subclasses build the layers and call `finish()`."""

    def __init__(self, cfg: ModelConfig, rope_dim: int, device: str) -> None:
        super().__init__()
        self.cfg = cfg
        # One RoPE table for all layers; each forward gathers its tokens' rows once.
        self.cos_sin: torch.Tensor
        self.register_buffer(
            "cos_sin",
            cos_sin_table(
                rope_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device,
                cfg.rope_freq_factors,
            ),
            persistent=False,
        )
        # Sliding layers' own RoPE base (Gemma 3), unscaled.
        self.cos_sin_local: torch.Tensor | None = None
        if cfg.rope_local_theta is not None:
            self.cos_sin_local = cos_sin_table(rope_dim, cfg.max_position_embeddings, cfg.rope_local_theta, None, device)
        self.targets: Targets = {}
        # Weights a checkpoint may hold in one of several layouts (GPT-OSS's experts: 3-D
        # tensors in safetensors, one tensor per expert in GGUF): one whole set must load.
        self.alternatives: list[tuple[frozenset[str], ...]] = []
        self.collectives: list[Insertion] = []
        # Decode steps' layers in native calls (modeling/fused_decode.py; set at build on CPU).
        self.fused_decode: FusedDecode | None = None

    def finish(
        self, embed: VocabParallelEmbedding, layers: list[tuple[str, SpmdModule]], norm: RMSNorm,
        comm: Communicator, dtype: torch.dtype, device: str, embed_scale: float | None = None,
    ) -> None:
        """Assemble body and head and run the placement compiler. embed_scale multiplies the
        embeddings (Gemma: sqrt(hidden))."""
        cfg = self.cfg
        self.targets["model.embed_tokens.weight"] = (embed, "weight", None)
        self.targets["model.norm.weight"] = (norm, "weight", None)
        # Token ids come in replicated; hidden states leave replicated.
        scale: list[tuple[str, SpmdModule]] = [] if embed_scale is None else [("embed_scale", Scale(embed_scale))]
        steps = [("embed_tokens", embed), *scale, *layers, ("norm", norm)]
        self.body = Chain(steps, in_placement=Replicate(), out_placement=Replicate())
        lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, comm, dtype, device,
            tied_to=embed if cfg.tie_word_embeddings else None,
        )
        if not cfg.tie_word_embeddings:
            self.targets["lm_head.weight"] = (lm_head, "weight", None)
        self.head = Chain([("lm_head", lm_head)], out_placement=Replicate())
        self.collectives = compile_placements(self, comm)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        ctx.rope = self.cos_sin[ctx.positions]
        if self.cos_sin_local is not None:
            ctx.rope_local = self.cos_sin_local[ctx.positions]
        fused = self.fused_decode
        hidden = fused.forward(input_ids, ctx) if fused is not None and fused.takes(ctx) else self.body(input_ids, ctx)
        logits = self.head(hidden[ctx.logits_indices], ctx)
        return logits[:, : self.cfg.vocab_size].float()

    def required_weights(self) -> set[str]:
        """Checkpoint names that must be present (those of `alternatives` are checked by
        missing_weights)."""
        return set(self.targets) - self.alternative_names()

    def alternative_names(self) -> set[str]:
        return {n for sets in self.alternatives for names in sets for n in names}

    def missing_weights(self, loaded: set[str]) -> list[str]:
        """Required names not loaded, and for each group of alternatives none of which fully
        loaded, what the one closest to complete lacks."""
        missing = set(self.required_weights()) - loaded
        for sets in self.alternatives:
            if not any(names <= loaded for names in sets):
                missing |= min((names - loaded for names in sets), key=len)
        return sorted(missing)
