"""The one output processor, shared by LLM (in-process) and AsyncLLM (engine in its own
process): it turns a client request into engine requests and engine updates into per-sample
deltas.

- fan-out: a request with n > 1 becomes n engine requests (ids `rid`, `rid-1`, ...; seeds
  `seed + i`); siblings are held back until the first sample's first update (its prefill
  is done), so they find the prompt's pages in the prefix cache instead of computing them;
- stop: EOS (unless ignore_eos) joins the request's stop token ids; a stop token is not
  part of the text; a stop string found by the detokenizer ends the sample (the caller
  aborts its engine request);
- text: incremental detokenization (engine/detokenizer.py); logprobs pass through as the
  engine's TokenLogprob.

The processor does no I/O: process() returns what to submit and abort, and its drivers
(engine/llm.py, engine/async_llm.py) do that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from agentspeed.control.plan import RequestSpec, RequestUpdate, TokenLogprob
from agentspeed.engine.detokenizer import IncrementalDetokenizer
from agentspeed.sampling_params import SamplingParams
from agentspeed.tokenizer import Tokenizer


@dataclass(slots=True)
class RequestDelta:
    """What one sample of a request gained since the last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class _Sample:
    request: _Request
    index: int
    spec: RequestSpec
    detok: IncrementalDetokenizer | None
    forced: list[int] | None = None  # test hook: the tokens shown instead of the sampled ones
    num_tokens: int = 0
    done: bool = False


@dataclass(slots=True)
class _Request:
    request_id: str
    samples: list[_Sample] = field(default_factory=list)
    pending_siblings: list[_Sample] = field(default_factory=list)


@dataclass(slots=True)
class Processed:
    """deltas: (client request id, delta) in update order. submit: engine requests to add
    now (held-back siblings). abort: engine request ids to abort (ended by a stop string)."""

    deltas: list[tuple[str, RequestDelta]] = field(default_factory=list)
    submit: list[RequestSpec] = field(default_factory=list)
    abort: list[str] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self._samples: dict[str, _Sample] = {}  # engine request id -> sample
        self._requests: dict[str, _Request] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos)

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, *,
                    session_key: str | None = None, cache_salt: str | None = None, priority: int = 0,
                    forced_output: Sequence[int] | None = None) -> RequestSpec:
        """Register a request; returns the engine request to submit now (its first sample).
        forced_output (a test hook): the engine runs that many tokens, EOS ignored, and the
        deltas show these tokens instead of the sampled ones, ending with finish "stop"."""
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        req = _Request(request_id)
        if forced_output is not None:
            params = msgspec.structs.replace(params, max_tokens=max(1, len(forced_output)), ignore_eos=True)
        prompt = tuple(prompt_ids)
        for i in range(params.n):
            p = params
            if params.n > 1:
                p = msgspec.structs.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            rid = request_id if i == 0 else f"{request_id}-{i}"
            spec = RequestSpec(rid, prompt, p.max_tokens, p.min_tokens, self.stop_token_ids(p), priority,
                               session_key, cache_salt, params=p)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt, p.stop, p.skip_special_tokens,
                                               p.include_stop_str_in_output)
            forced = list(forced_output) if forced_output is not None else None
            req.samples.append(_Sample(req, i, spec, detok, forced))
        req.pending_siblings = req.samples[1:]
        self._requests[request_id] = req
        first = req.samples[0]
        self._samples[first.spec.request_id] = first
        return first.spec

    def process(self, updates: Sequence[RequestUpdate]) -> Processed:
        out = Processed()
        for u in updates:
            s = self._samples.get(u.request_id)
            if s is not None and not s.done:
                self._update(s, u, out)
        return out

    def _update(self, s: _Sample, u: RequestUpdate, out: Processed) -> None:
        req = s.request
        if req.pending_siblings:
            sibs, req.pending_siblings = req.pending_siblings, []
            for sib in sibs:
                self._samples[sib.spec.request_id] = sib
                out.submit.append(sib.spec)
        new = list(u.new_token_ids)
        if s.forced is not None:
            new = s.forced[s.num_tokens : s.num_tokens + len(new)]
        s.num_tokens += len(new)
        finish = u.finish_reason.value if u.finish_reason is not None else None
        if finish == "length" and s.forced is not None and s.num_tokens >= len(s.forced):
            finish = "stop"  # the forced text stands for a whole answer: the model ended there
        stop_ids = s.spec.stop_token_ids
        ends_with_stop = finish == "stop" and bool(new) and new[-1] in stop_ids
        stop_reason: int | str | None = new[-1] if ends_with_stop and new[-1] not in self.eos else None
        text = ""
        if s.detok is not None:
            # A stop token is not part of the text (EOS included).
            text = s.detok.update(new[:-1] if ends_with_stop else new, finish is not None)
            if s.detok.stopped and finish is None:
                finish, stop_reason = "stop", s.detok.stop_reason
                out.abort.append(s.spec.request_id)
        logprobs = None
        if s.spec.params.logprobs is not None:
            logprobs = list(u.logprobs)
            if s.forced is not None and logprobs and new:
                logprobs = [msgspec.structs.replace(logprobs[-1], token_id=new[-1])]
        if finish is not None:
            self._finish_sample(s)
        if finish == "error" and not new and u.message:
            delta = RequestDelta(s.index, "", [], None, "error", None, 0, u.message)
        else:
            delta = RequestDelta(s.index, text, new, logprobs, finish, stop_reason, u.num_cached_tokens)
        out.deltas.append((req.request_id, delta))

    def _finish_sample(self, s: _Sample) -> None:
        s.done = True
        self._samples.pop(s.spec.request_id, None)
        req = s.request
        if all(x.done for x in req.samples):
            self._requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns the engine ids of its samples still running."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return []
        running = [s.spec.request_id for s in req.samples if not s.done and s.spec.request_id in self._samples]
        for s in req.samples:
            s.done = True
            self._samples.pop(s.spec.request_id, None)
        return running

    def abort_deltas(self, request_id: str) -> tuple[list[str], list[RequestDelta]]:
        """Forget a request that a client aborted: the engine ids of its samples still
        running, and a finish "abort" delta for each sample that had not finished."""
        req = self._requests.get(request_id)
        if req is None:
            return [], []
        deltas = [RequestDelta(s.index, "", [], None, "abort") for s in req.samples if not s.done]
        return self.abort(request_id), deltas

    def fail_all(self, why: str) -> list[tuple[str, RequestDelta]]:
        """End every live sample with an error delta (the engine is gone)."""
        deltas = []
        for req in self._requests.values():
            for s in req.samples:
                if not s.done:
                    s.done = True
                    deltas.append((req.request_id, RequestDelta(s.index, "", [], None, "error", None, 0, why)))
        self._samples.clear()
        self._requests.clear()
        return deltas
