"""Engine-side compilation of constraints, cached.

The backend (and the tokenizer it reads) is built on the first constrained request, so an
engine that never sees one pays nothing. Compiling happens where requests are admitted
(EngineCore.add_request), so a constraint that does not compile is refused before the
request is scheduled: the client gets a 400, never an error mid-stream. Compiled grammars
are cached by constraint (the tokenizer is fixed per engine); agents send the same tool
schemas every turn, so after the first turn compiling is a dictionary lookup."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from agentspeed.model_source import ModelSource
from agentspeed.sampling_params import StructuredOutputs
from agentspeed.structured.backend import (
    GrammarBackend,
    Matcher,
    load_backend,
    resolve_backend_name,
)

log = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(self, backend: str, source: ModelSource, vocab_size: int, stop_token_ids: Sequence[int],
                 cache_size: int = 256) -> None:
        self.backend_name = resolve_backend_name(backend)
        self.source = source
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self._backend: GrammarBackend | None = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.hits = 0  # compiles answered from the cache
        self.misses = 0  # successful compiles

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            from agentspeed.tokenizer import Tokenizer

            t0 = time.perf_counter()
            tok = Tokenizer.load(self.source)
            stops = list(dict.fromkeys([*self.stop_token_ids, *tok.eos_token_ids]))
            self._backend = load_backend(self.backend_name, tok.hf, self.vocab_size, stops)
            log.info("structured output: %s backend ready in %.2fs", self.backend_name, time.perf_counter() - t0)
        return self._backend

    def compile(self, c: StructuredOutputs) -> Any:
        """The compiled grammar of c; raises GrammarError (naming the problem)."""
        key = c.key()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        compiled = self.backend.compile(c)
        self.misses += 1
        self._cache[key] = compiled
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, compiled: Any) -> Matcher:
        return self.backend.matcher(compiled)
