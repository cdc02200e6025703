"""Batched sampling: turns per-request SamplingParams into one SamplingTensors and calls the
`sample` kernel once per step. Seeded requests own a generator for their whole life.
Penalties are applied to the logits of the rows that ask for them; logprobs are of the
model's raw distribution (before temperature and filters), as in vLLM's default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentspeed.kernels.api import KernelSet, SamplingTensors
from agentspeed.sampling_params import SamplingParams

# (logprob of the chosen token, top alternatives as (token id, logprob), best first)
TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True, slots=True)
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: list[TokenLogprobs | None] | None  # per row, None where not requested


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

    @staticmethod
    def _apply_penalties(
        logits: torch.Tensor, row: int, p: SamplingParams, prompt: Sequence[int], output: Sequence[int]
    ) -> None:
        vocab = logits.shape[-1]
        out = torch.tensor(list(output), dtype=torch.int64, device=logits.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
        if p.repetition_penalty != 1:
            seen = counts > 0
            if prompt:
                seen[torch.tensor(list(prompt), dtype=torch.int64, device=logits.device)] = True
            x = logits[row]
            penalised = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            logits[row] = torch.where(seen, penalised, x)
        if p.frequency_penalty or p.presence_penalty:
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    def sample(
        self,
        logits: torch.Tensor,
        request_ids: Sequence[str],
        params: Sequence[SamplingParams],
        histories: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
    ) -> SampleOutput:
        """histories[i] = (prompt ids, output ids) of row i; needed only for penalties."""
        want_lp = [p.logprobs for p in params]
        raw_lp = logits.log_softmax(-1) if any(k is not None for k in want_lp) else None
        if any(p.has_penalties for p in params):
            assert histories is not None, "penalties need token histories"
            logits = logits.clone()
            for i, p in enumerate(params):
                if p.has_penalties:
                    self._apply_penalties(logits, i, p, *histories[i])
        all_greedy = all(p.greedy for p in params)
        if all_greedy:  # the common agent case: skip building per-row tensors
            ids = logits.argmax(-1)
            return SampleOutput(ids, self._logprobs(raw_lp, ids, want_lp) if raw_lp is not None else None)
        gens: tuple[torch.Generator | None, ...] = ()
        if not all_greedy:
            gens = tuple(None if p.greedy else self._generator(r, p) for r, p in zip(request_ids, params))
        dev = logits.device
        st = SamplingTensors(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            top_k=torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int64, device=dev),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev),
            generators=gens,
            all_greedy=all_greedy,
            use_top_p=any(p.top_p < 1 for p in params),
            use_top_k=any(p.top_k > 0 for p in params),
            use_min_p=any(p.min_p > 0 for p in params),
        )
        ids = self.kernels.sample(logits, st)
        if raw_lp is None:
            return SampleOutput(ids, None)
        return SampleOutput(ids, self._logprobs(raw_lp, ids, want_lp))

    @staticmethod
    def _logprobs(
        raw_lp: torch.Tensor, ids: torch.Tensor, want_lp: list[int | None]
    ) -> list[TokenLogprobs | None]:
        chosen = raw_lp.gather(-1, ids[:, None])[:, 0].tolist()
        k_max = max(k or 0 for k in want_lp)
        top_v, top_i = raw_lp.topk(k_max, -1) if k_max else (raw_lp[:, :0], ids[:, None][:, :0])
        top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
        lps: list[TokenLogprobs | None] = []
        for i, k in enumerate(want_lp):
            if k is None:
                lps.append(None)
            else:
                lps.append((chosen[i], tuple(zip(top_i_l[i][:k], top_v_l[i][:k]))))
        return lps
