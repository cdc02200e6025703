"""The model runner: owns the model, the KV cache tensors and the sampler on one rank, and
turns a step's SequenceChunks into logits and sampled tokens. Every tensor-parallel rank runs
the same calls with the same chunks (SPMD); sampled tokens are taken from rank 0."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from agentspeed.config import EngineConfig
from agentspeed.execution.inputs import SequenceChunk, build_inputs
from agentspeed.execution.kv_cache import KVCache
from agentspeed.execution.sampler import Sampler
from agentspeed.modeling.build import build_model
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.context import ForwardContext
from agentspeed.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        device_hint = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        if device_hint == "cuda" and cfg.parallel.tp > 1:
            torch.cuda.set_device(cfg.parallel.rank)
        self.comm = Communicator.init(cfg.parallel, device_hint)
        built = build_model(cfg, self.comm)
        self.model = built.model
        self.model_config = built.config
        self.source = built.source
        self.device = built.device
        self.dtype = built.dtype
        self.kernels = built.kernels
        self.kv = KVCache(built.config, cfg.cache, self.comm.world_size, built.dtype, built.device)
        self.page_size = cfg.cache.page_size
        self.max_model_len = min(
            cfg.max_model_len or built.config.max_position_embeddings, built.config.max_position_embeddings
        )
        self.sampler = Sampler(built.kernels, built.device, cfg.seed)
        log.info(
            "KV cache: %d pages x %d tokens = %d tokens", self.kv.num_pages - 1, self.page_size, self.kv.num_tokens
        )

    @torch.inference_mode()
    def forward(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """fp32 logits [number of chunks with sample=True, vocab], in chunk order."""
        inputs = build_inputs(chunks, self.page_size, self.device)
        ctx = ForwardContext(inputs.positions, inputs.attn, self.kv.layers, inputs.logits_indices)
        return self.model(inputs.input_ids, ctx)

    @torch.inference_mode()
    def execute(
        self, chunks: Sequence[SequenceChunk], params: Sequence[SamplingParams]
    ) -> list[int]:
        """Run one step; one sampled token per chunk with sample=True (params align with
        those chunks), identical on every rank."""
        logits = self.forward(chunks)
        sampling = [c for c in chunks if c.sample]
        if not sampling:
            return []
        ids = self.sampler.sample(logits, [c.request_id for c in sampling], params)
        ids = self.comm.broadcast(ids, src=0)
        return ids.tolist()

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    def shutdown(self) -> None:
        self.comm.shutdown()
