"""Batched sampling: turns the batch's SamplingParams into one SamplingTensors and calls the
`sample` kernel once per step. Seeded requests own a generator for their whole life (kept in
their RequestState). Penalties are applied to the rows that ask for them from the
persistent per-request counts; grammar masks after them (execution/structured.py);
logprobs are of the model's raw distribution (before penalties, masks, temperature and
filters), as in vLLM's default."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from agentspeed.control.plan import TokenLogprob
from agentspeed.execution.request_state import RequestState
from agentspeed.kernels.api import KernelSet, SamplingTensors


@dataclass(frozen=True, slots=True)
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: list[TokenLogprob | None] | None  # per row, None where not requested


class Sampler:
    def __init__(self, kernels: KernelSet, device: str, seed: int) -> None:
        self.kernels = kernels
        self.device = device
        # Unseeded requests share the engine's generator (seeded by --seed).
        self.shared = torch.Generator(device).manual_seed(seed)

    def _generator(self, st: RequestState) -> torch.Generator:
        if st.params.seed is None:
            return self.shared
        if st.generator is None:
            st.generator = torch.Generator(self.device).manual_seed(st.params.seed)
        return st.generator

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: list[int], states: Sequence[RequestState]) -> None:
        """Penalise logits[rows] in place from those requests' counts (created on first use)."""
        vocab = logits.shape[-1]
        for i in rows:
            st = states[i]
            if st.counts is None:
                st.counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
                if st.params.repetition_penalty != 1:
                    st.seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                    if st.prompt:
                        st.seen[torch.tensor(st.prompt, dtype=torch.int64, device=logits.device)] = True
        for i in rows:
            p, st = states[i].params, states[i]
            assert st.counts is not None
            if st.seen is not None:
                x = logits[i]
                penalised = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
                logits[i] = torch.where(st.seen, penalised, x)
            if p.frequency_penalty or p.presence_penalty:
                logits[i] -= p.frequency_penalty * st.counts + p.presence_penalty * (st.counts > 0).to(logits.dtype)

    def sample(self, logits: torch.Tensor, states: Sequence[RequestState],
               mask: Callable[[torch.Tensor], None] | None = None) -> SampleOutput:
        """One token per row; row i belongs to states[i]. Counts are not updated here (the
        caller records the tokens that stand, after verification). mask: applies the
        constrained rows' grammar masks in place, after penalties and before sampling."""
        params = [st.params for st in states]
        want_lp = [p.logprobs for p in params]
        raw_lp = logits.log_softmax(-1) if any(k is not None for k in want_lp) else None
        penalised = [i for i, p in enumerate(params) if p.has_penalties]
        if penalised:
            logits = logits.clone()
            self._apply_penalties(logits, penalised, states)
        if mask is not None:
            mask(logits)
        all_greedy = all(p.greedy for p in params)
        if all_greedy:  # the common agent case: skip building per-row tensors
            ids = logits.argmax(-1)
            return SampleOutput(ids, self._logprobs(raw_lp, ids, want_lp) if raw_lp is not None else None)
        gens = tuple(None if p.greedy else self._generator(st) for p, st in zip(params, states))
        dev = logits.device
        tensors = SamplingTensors(
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
        ids = self.kernels.sample(logits, tensors)
        if raw_lp is None:
            return SampleOutput(ids, None)
        return SampleOutput(ids, self._logprobs(raw_lp, ids, want_lp))

    @staticmethod
    def _logprobs(
        raw_lp: torch.Tensor, ids: torch.Tensor, want_lp: list[int | None]
    ) -> list[TokenLogprob | None]:
        chosen = raw_lp.gather(-1, ids[:, None])[:, 0].tolist()
        k_max = max(k or 0 for k in want_lp)
        top_v, top_i = raw_lp.topk(k_max, -1) if k_max else (raw_lp[:, :0], ids[:, None][:, :0])
        top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
        ids_l = ids.tolist()
        lps: list[TokenLogprob | None] = []
        for i, k in enumerate(want_lp):
            if k is None:
                lps.append(None)
            else:
                lps.append(TokenLogprob(ids_l[i], chosen[i], tuple(zip(top_i_l[i][:k], top_v_l[i][:k]))))
        return lps
