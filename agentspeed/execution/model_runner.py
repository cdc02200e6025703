"""The model runner: owns the model, the KV cache tensors and the sampler on one rank, and
turns a step's SequenceChunks into logits and sampled tokens. Every tensor-parallel rank runs
the same calls with the same chunks (SPMD); sampled tokens are taken from rank 0."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from agentspeed.config import EngineConfig
from agentspeed.control.plan import LAST_SAMPLED, ExecutionPlan, StepResult
from agentspeed.execution.inputs import SequenceChunk, build_inputs
from agentspeed.execution.kv_cache import KVCache
from agentspeed.execution.sampler import Sampler, TokenLogprobs
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
        if device_hint == "cpu" and cfg.parallel.tp > 1:
            # Ranks share the cores: more OpenMP threads than cores makes every parallel
            # region wait on a descheduled thread.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.parallel.tp))
        self.comm = Communicator.init(cfg.parallel, device_hint)
        built = build_model(cfg, self.comm)
        self.model = built.model
        self.model_config = built.config
        self.source = built.source
        self.device = built.device
        self.dtype = built.dtype
        self.kernels = built.kernels
        self.page_size = cfg.cache.page_size
        self.max_model_len = min(
            cfg.max_model_len or built.config.max_position_embeddings, built.config.max_position_embeddings
        )
        self.kv = KVCache(
            built.config, cfg.cache, self.comm.world_size, built.dtype, built.device,
            max_tokens_useful=self.max_model_len * cfg.max_num_seqs,
        )
        self.sampler = Sampler(built.kernels, built.device, cfg.seed)
        # Execution-side request state, keyed by request id: sampling settings and the last
        # sampled token (what LAST_SAMPLED in a plan refers to).
        self.params: dict[str, SamplingParams] = {}
        self.prompts: dict[str, Sequence[int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.last_sampled: dict[str, int] = {}

    @torch.inference_mode()
    def forward(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """fp32 logits [rows, vocab], in chunk order: one row per chunk with sample=True, 1 +
        num_draft rows for a chunk with drafts."""
        inputs = build_inputs(chunks, self.page_size, self.device)
        ctx = ForwardContext(inputs.positions, inputs.attn, self.kv.layers, inputs.logits_indices)
        return self.model(inputs.input_ids, ctx)

    @torch.inference_mode()
    def execute(
        self, chunks: Sequence[SequenceChunk], params: Sequence[SamplingParams]
    ) -> list[int]:
        """Run one step; one sampled token per chunk with sample=True (params align with
        those chunks), identical on every rank."""
        return self._execute(chunks, params)[0]

    def _execute(
        self, chunks: Sequence[SequenceChunk], params: Sequence[SamplingParams]
    ) -> tuple[list[int], list[TokenLogprobs | None] | None, dict[str, tuple[int, ...]]]:
        """(a sampled token per sampling chunk, their logprobs, the accepted continuation of
        each chunk with drafts: see StepResult.accepted)."""
        logits = self.forward(chunks)
        sampling = [c for c in chunks if c.sample]
        rids = [c.request_id for c in sampling]
        if not rids:
            return [], None, {}
        drafts = any(c.num_draft for c in sampling)
        firsts = logits
        if drafts:
            # Row 0 of a chunk with drafts is the plain decode's row (what `sampled` holds);
            # the argmax of every row is what verification compares the drafts with.
            rows, first = 0, []
            for c in sampling:
                first.append(rows)
                rows += 1 + c.num_draft
            firsts = logits[torch.tensor(first, device=logits.device)]
        histories = None
        if any(p.has_penalties for p in params):
            histories = [(self.prompts.get(r, ()), self.outputs.get(r, ())) for r in rids]
        out = self.sampler.sample(firsts, rids, params, histories)
        if not drafts:
            ids = self.comm.broadcast(out.token_ids, src=0).tolist()
            accepted: dict[str, tuple[int, ...]] = {}
        else:
            both = self.comm.broadcast(torch.cat((out.token_ids, logits.argmax(-1))), src=0).tolist()
            ids, best = both[: len(rids)], both[len(rids) :]
            accepted = {c.request_id: _verify(c.token_ids[len(c.token_ids) - c.num_draft :], t, best[f + 1 :])
                        for c, t, f in zip(sampling, ids, first) if c.num_draft}
        for r, t in zip(rids, ids):
            if r in self.outputs:
                self.outputs[r].append(t)
                self.outputs[r].extend(accepted.get(r, ()))
        return ids, out.logprobs, accepted

    def add_request(self, request_id: str, params: SamplingParams, prompt: Sequence[int] = ()) -> None:
        self.params[request_id] = params
        self.outputs[request_id] = []
        if params.has_penalties:
            self.prompts[request_id] = prompt

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)
        for d in (self.params, self.prompts, self.outputs, self.last_sampled):
            d.pop(request_id, None)  # type: ignore[attr-defined]

    def execute_plan(self, plan: ExecutionPlan) -> StepResult:
        """Run one scheduler step. Steps must run in plan order: a LAST_SAMPLED input is the
        token this runner sampled for that request in the previous step."""
        chunks = [
            SequenceChunk(
                c.request_id,
                [self.last_sampled[c.request_id] if t == LAST_SAMPLED else t for t in c.token_ids],
                c.start,
                c.pages,
                c.sample,
                c.num_draft,
            )
            for c in plan.chunks
        ]
        sampling = [c.request_id for c in plan.chunks if c.sample]
        ids, lps, accepted = self._execute(chunks, [self.params[r] for r in sampling]) if chunks else ([], None, {})
        sampled = dict(zip(sampling, ids))
        self.last_sampled.update(sampled)
        for r, more in accepted.items():
            if more:
                self.last_sampled[r] = more[-1]
        logprobs = {r: lp for r, lp in zip(sampling, lps) if lp is not None} if lps else {}
        for rid in plan.released:
            self.release(rid)
        return StepResult(plan.step_id, sampled, logprobs, accepted)

    def shutdown(self) -> None:
        self.comm.shutdown()


def _verify(drafts: Sequence[int], first: int, best: Sequence[int]) -> tuple[int, ...]:
    """Greedy verification: best[i] is the argmax after draft i. Draft i stands while it equals
    the token before it (first, then each accepted argmax); returns the argmaxes after the
    drafts that stand, so the result is exactly what plain greedy decoding would produce."""
    out: list[int] = []
    prev = first
    for i, d in enumerate(drafts):
        if d != prev:
            break
        prev = best[i]
        out.append(prev)
    return tuple(out)
