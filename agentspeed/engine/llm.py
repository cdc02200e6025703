"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)) and .chat(...),
shaped like vLLM's so code written for it ports with an import change."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agentspeed.config import CacheConfig, EngineConfig, KernelConfig, ParallelConfig
from agentspeed.control.plan import RequestSpec
from agentspeed.engine.core import EngineCore, SchedulingOptions
from agentspeed.engine.detokenizer import IncrementalDetokenizer
from agentspeed.engine.outputs import CompletionOutput, RequestOutput
from agentspeed.errors import ConfigError
from agentspeed.sampling_params import SamplingParams
from agentspeed.tokenizer import Message, Tokenizer

log = logging.getLogger(__name__)

PromptInput = str | dict[str, Any] | Sequence[int]


@dataclass(slots=True)
class _Sample:
    """One of a request's n samples, as the engine runs it."""

    owner: RequestOutput
    out: CompletionOutput
    params: SamplingParams
    spec: RequestSpec
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer | None
    done: bool = False
    siblings: list[_Sample] = field(default_factory=list)  # submitted after our prefill


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        page_size: int = 16,
        num_kv_pages: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_dtype: str = "auto",
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        enable_prefix_caching: bool = True,
        overlap: bool | None = None,
        kernel_backend: str | None = None,
        skip_tokenizer_init: bool = False,
        chat_template: str | None = None,
        engine_config: EngineConfig | None = None,
        num_speculative_tokens: int | None = None,
        ngram_max: int = 3,
        ngram_min: int = 1,
        adaptive_drafts: bool = True,
    ) -> None:
        cfg = engine_config or EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            seed=seed,
            parallel=ParallelConfig(tp=tensor_parallel_size),
            max_num_seqs=max_num_seqs,
            cache=CacheConfig(page_size=page_size, num_pages=num_kv_pages, kv_cache_memory=kv_cache_memory,
                              gpu_memory_utilization=gpu_memory_utilization, kv_cache_dtype=kv_cache_dtype),
            kernels=KernelConfig.parse(kernel_backend),
        )
        if cfg.parallel.tp > 1 and engine_config is None:
            raise ConfigError(
                "LLM(tensor_parallel_size>1) needs the multi-process engine (agentspeed serve); "
                "use `agentspeed generate --tp N` for offline tensor-parallel generation"
            )
        self.engine = EngineCore.build(
            cfg, SchedulingOptions(max_num_batched_tokens, max_num_seqs, enable_prefix_caching, overlap,
                                   num_speculative_tokens, ngram_max, ngram_min, adaptive_drafts)
        )
        self.runner = self.engine.runner
        self.tokenizer = None if skip_tokenizer_init else Tokenizer.load(self.runner.source, chat_template)
        eos = list(self.runner.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos += self.tokenizer.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        self._ids = itertools.count()

    # ---- inputs -------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"])
            prompt = str(prompt["prompt"])
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("text prompts need a tokenizer: pass {'prompt_token_ids': [...]}")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    # ---- public API ---------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Outputs in prompt order. Requests run together with continuous batching."""
        prompt_list: list[PromptInput]
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompt_list = [prompts]  # type: ignore[list-item]
        else:
            prompt_list = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompt_list)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompt_list):
            raise ConfigError("sampling_params must be one, or one per prompt")
        results: list[RequestOutput] = []
        live: dict[str, _Sample] = {}
        for prompt, p in zip(prompt_list, params):
            text, ids = self._tokenize(prompt)
            owner = RequestOutput(f"req-{next(self._ids)}", text, ids)
            results.append(owner)
            samples = [self._make_sample(owner, i, p, ids) for i in range(p.n)]
            # Siblings start once the first sample's prefill is done, so they find the
            # prompt's pages in the prefix cache instead of computing them again.
            samples[0].siblings = samples[1:]
            self._submit(samples[0], live)
        while live:
            for u in self.engine.step():
                s = live.get(u.request_id)
                if s is None:
                    continue
                self._on_update(s, u.new_token_ids, u.finish_reason.value if u.finish_reason else None,
                                u.num_cached_tokens, live)
        for r in results:
            r.finished = True
        return results

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ConfigError("chat needs a tokenizer")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": self.tokenizer.apply_chat_template(c, add_generation_prompt)}  # type: ignore[arg-type]
            for c in convs
        ]
        return self.generate(prompts, sampling_params)

    # ---- internals ----------------------------------------------------------------------
    def _make_sample(self, owner: RequestOutput, index: int, p: SamplingParams, ids: list[int]) -> _Sample:
        if p.n > 1 and p.seed is not None:
            p = SamplingParams(**{**_fields(p), "n": 1, "seed": p.seed + index})
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        rid = owner.request_id if index == 0 else f"{owner.request_id}-{index}"
        spec = RequestSpec(rid, tuple(ids), p.max_tokens, p.min_tokens, stop_ids)
        out = CompletionOutput(index, "", [], logprobs=[] if p.logprobs is not None else None,
                               cumulative_logprob=0.0 if p.logprobs is not None else None)
        owner.outputs.append(out)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, p.stop, p.skip_special_tokens,
                                           p.include_stop_str_in_output)
        return _Sample(owner, out, p, spec, stop_ids, detok)

    def _submit(self, s: _Sample, live: dict[str, _Sample]) -> None:
        from agentspeed.control.scheduler import RequestRejected

        try:
            self.engine.add_request(s.spec, s.params)
        except RequestRejected as e:
            s.out.finish_reason = "error"
            s.out.text = str(e)
            s.done = True
            for sib in s.siblings:
                self._submit(sib, live)
            return
        live[s.spec.request_id] = s

    def _on_update(
        self, s: _Sample, new: tuple[int, ...], finish: str | None, cached: int, live: dict[str, _Sample]
    ) -> None:
        if s.out.index == 0:
            s.owner.num_cached_tokens = cached
        if s.siblings:
            sibs, s.siblings = s.siblings, []
            for sib in sibs:
                self._submit(sib, live)
        if s.out.logprobs is not None:
            lp = self.engine.last_logprobs.get(s.spec.request_id)
            if lp is not None:
                chosen, top = lp
                s.out.logprobs.append({new[-1]: chosen, **dict(top)})
                s.out.cumulative_logprob = (s.out.cumulative_logprob or 0.0) + chosen
        s.out.token_ids.extend(new)
        if finish == "stop" and new and new[-1] in s.stop_ids:
            s.out.stop_reason = new[-1] if new[-1] not in self.eos_token_ids else None
        if s.detok is not None:
            # A stop token is not part of the text (EOS included).
            shown = new[:-1] if finish == "stop" and new and new[-1] in s.stop_ids else new
            s.out.text += s.detok.update(shown, finish is not None)
            if s.detok.stopped and finish is None:
                self.engine.abort(s.spec.request_id)
                finish = "stop"
                s.out.stop_reason = s.detok.stop_reason
        if finish is not None:
            s.out.finish_reason = finish
            s.done = True
            live.pop(s.spec.request_id, None)

    def shutdown(self) -> None:
        self.engine.shutdown()


def _fields(p: SamplingParams) -> dict[str, Any]:
    return {f: getattr(p, f) for f in p.__struct_fields__}
