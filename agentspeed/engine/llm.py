"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)) and .chat(...),
shaped like vLLM's so code written for it ports with an import change."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

from agentspeed.config import (
    CacheConfig,
    EngineConfig,
    KernelConfig,
    ParallelConfig,
    SchedulingConfig,
)
from agentspeed.engine.core import EngineCore
from agentspeed.engine.output_processor import OutputProcessor, RequestDelta
from agentspeed.engine.outputs import CompletionOutput, RequestOutput
from agentspeed.errors import ConfigError
from agentspeed.sampling_params import SamplingParams
from agentspeed.tokenizer import Message, Tokenizer

log = logging.getLogger(__name__)

PromptInput = str | dict[str, Any] | Sequence[int]


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
        disable_hybrid_kv_cache_manager: bool = False,
        structured_output_backend: str = "auto",
        session_retention: bool = True,
        partial_page_reuse: bool = True,
        kv_offload_memory: int | None = None,
        kv_offload_dtype: str = "auto",
        kv_offload_writeback: bool = True,
        kv_offload_dir: str | None = None,
        kv_offload_disk: int | None = None,
    ) -> None:
        """Keywords build the EngineConfig (vLLM's names); engine_config, if given, is the
        whole config instead (as `agentspeed generate` builds it from its flags)."""
        cfg = engine_config or EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            seed=seed,
            parallel=ParallelConfig(tp=tensor_parallel_size),
            cache=CacheConfig(page_size=page_size, num_pages=num_kv_pages, kv_cache_memory=kv_cache_memory,
                              gpu_memory_utilization=gpu_memory_utilization, kv_cache_dtype=kv_cache_dtype,
                              hybrid_kv=not disable_hybrid_kv_cache_manager,
                              kv_offload_memory=kv_offload_memory, kv_offload_dtype=kv_offload_dtype,
                              kv_offload_writeback=kv_offload_writeback,
                              kv_offload_dir=kv_offload_dir, kv_offload_disk=kv_offload_disk),
            kernels=KernelConfig.from_spec(kernel_backend),
            scheduling=SchedulingConfig(max_num_batched_tokens, max_num_seqs, enable_prefix_caching, overlap,
                                        num_speculative_tokens, ngram_max, ngram_min, adaptive_drafts,
                                        session_retention=session_retention,
                                        partial_page_reuse=partial_page_reuse),
            structured_output_backend=structured_output_backend,
        )
        if cfg.parallel.tp > 1 and engine_config is None:
            raise ConfigError(
                "LLM(tensor_parallel_size>1) needs the multi-process engine (agentspeed serve); "
                "use `agentspeed generate --tp N` for offline tensor-parallel generation"
            )
        self.engine = EngineCore.build(cfg)
        self.runner = self.engine.runner
        self.tokenizer = None if skip_tokenizer_init else Tokenizer.load(self.runner.source, chat_template)
        eos = list(self.runner.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos += self.tokenizer.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        self.processor = OutputProcessor(self.tokenizer, eos)
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
        results: dict[str, RequestOutput] = {}
        for prompt, p in zip(prompt_list, params):
            text, ids = self._tokenize(prompt)
            owner = RequestOutput(f"req-{next(self._ids)}", text, ids)
            owner.outputs = [CompletionOutput(i, "", [], logprobs=[] if p.logprobs is not None else None,
                                              cumulative_logprob=0.0 if p.logprobs is not None else None)
                             for i in range(p.n)]
            results[owner.request_id] = owner
            self.engine.add_request(self.processor.add_request(owner.request_id, ids, p))
        while len(self.processor):
            done = self.processor.process(self.engine.step())
            for spec in done.submit:
                self.engine.add_request(spec)
            for rid in done.abort:
                self.engine.abort(rid)
            for rid, d in done.deltas:
                _accumulate(results[rid].outputs[d.index], d)
                if d.index == 0:
                    results[rid].num_cached_tokens = d.num_cached_tokens
        for r in results.values():
            r.finished = True
        return list(results.values())

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

    def shutdown(self) -> None:
        self.engine.shutdown()


def _accumulate(out: CompletionOutput, d: RequestDelta) -> None:
    out.token_ids.extend(d.token_ids)
    out.text += d.text
    if d.logprobs and out.logprobs is not None:
        for lp in d.logprobs:
            out.logprobs.append({lp.token_id: lp.logprob, **dict(lp.top)})
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) + lp.logprob
    if d.finish_reason is not None:
        out.finish_reason = d.finish_reason
        out.stop_reason = d.stop_reason
        if d.error is not None:
            out.text = d.error
