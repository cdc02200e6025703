"""Batched sampling: turns per-request SamplingParams into one SamplingTensors and calls the
`sample` kernel once per step. Seeded requests own a generator for their whole life."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from agentspeed.kernels.api import KernelSet, SamplingTensors
from agentspeed.sampling_params import SamplingParams


class Sampler:
    def __init__(self, kernels: KernelSet, device: str, seed: int) -> None:
        self.kernels = kernels
        self.device = device
        # Unseeded requests share the engine's generator (seeded by --seed).
        self.shared = torch.Generator(device).manual_seed(seed)
        self.per_request: dict[str, torch.Generator] = {}

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self.shared
        g = self.per_request.get(request_id)
        if g is None:
            g = self.per_request[request_id] = torch.Generator(self.device).manual_seed(params.seed)
        return g

    def release(self, request_id: str) -> None:
        self.per_request.pop(request_id, None)

    def sample(
        self, logits: torch.Tensor, request_ids: Sequence[str], params: Sequence[SamplingParams]
    ) -> torch.Tensor:
        all_greedy = all(p.greedy for p in params)
        if all_greedy:
            gens: tuple[torch.Generator | None, ...] = ()
        else:
            gens = tuple(
                None if p.greedy else self._generator(r, p) for r, p in zip(request_ids, params)
            )
        dev = logits.device
        st = SamplingTensors(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            top_k=torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int64, device=dev),
            generators=gens,
            all_greedy=all_greedy,
            use_top_p=any(p.top_p < 1 for p in params),
            use_top_k=any(p.top_k > 0 for p in params),
        )
        return self.kernels.sample(logits, st)
