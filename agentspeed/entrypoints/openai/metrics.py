"""Prometheus metrics of the server, in their own registry (no process-global state).

Request-level series are recorded as requests finish; engine-level gauges (running, waiting,
KV pages, preemptions) are read from the latest engine stats at scrape time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agentspeed.engine.messages import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    20.0, 40.0, 80.0, 160.0, 320.0)
_ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], throughput: Callable[[], float], model: str) -> None:
        self._stats, self._throughput, self._model = stats, throughput, model

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"agentspeed:{name}", doc, labels=labels)
            g.add_metric([self._model], value)
            return g

        yield gauge("num_requests_running", "Requests in the engine's running batch", s.num_running)
        yield gauge("num_requests_waiting", "Requests queued in the engine", s.num_waiting)
        yield gauge("kv_pages_used", "KV cache pages held by live requests", s.kv_pages_used)
        yield gauge("kv_pages_total", "KV cache pages in the pool", s.kv_pages_total)
        yield gauge("kv_cache_usage_perc", "Fraction of KV pages held by live requests",
                    s.kv_pages_used / s.kv_pages_total if s.kv_pages_total else 0.0)
        if s.kv_window_pages_total:  # a hybrid model: its sliding-window layers' own pool
            yield gauge("kv_window_pages_used", "Sliding-window layers' KV pages held by live requests",
                        s.kv_window_pages_used)
            yield gauge("kv_window_pages_total", "KV pages in the sliding-window layers' pool",
                        s.kv_window_pages_total)
        yield gauge("generation_tokens_per_second", "Generated tokens per second over the last 10 s",
                    self._throughput())
        c = CounterMetricFamily("agentspeed:num_preemptions", "Requests preempted (recomputed) by the engine",
                                labels=labels)
        c.add_metric([self._model], s.num_preemptions)
        yield c
        for name, doc, v in (
            ("spec_decode_num_draft_tokens", "Speculative draft tokens verified", s.num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted", s.num_accepted_tokens),
            ("structured_output_requests", "Requests with a decoding constraint", s.num_structured_requests),
            ("structured_output_grammar_cache_hits", "Constrained requests whose grammar was cached",
             s.num_grammar_cache_hits),
            ("prefix_cache_partial_page_hit_tokens", "Prompt tokens reused from partly filled KV pages "
             "(a previous turn's last page)", s.num_partial_hit_tokens),
            ("kv_cache_evictions", "Cached prefix pages evicted from the KV pool", s.kv_evictions),
            ("kv_tier_stores", "KV pages copied to the host tier", s.kv_tier_stores),
            ("kv_tier_writebacks", "Of the KV pages copied to the host tier, those copied ahead of their "
             "eviction from the pool", s.kv_tier_writebacks),
            ("kv_disk_read_failures", "Disk-tier KV copies missing or corrupt when read back (recomputed)",
             s.kv_disk_failed),
        ):
            c = CounterMetricFamily(f"agentspeed:{name}", doc, labels=labels)
            c.add_metric([self._model], v)
            yield c
        if s.kv_tier_pages_total:
            yield gauge("kv_tier_pages_used", "KV pages the host tier holds", s.kv_tier_pages_used)
            yield gauge("kv_tier_pages_total", "KV pages the host tier can hold", s.kv_tier_pages_total)
        if s.kv_disk_pages_total:
            yield gauge("kv_disk_pages_used", "KV pages the disk tier holds", s.kv_disk_pages_used)
            yield gauge("kv_disk_pages_total", "KV pages the disk tier can hold", s.kv_disk_pages_total)
        c = CounterMetricFamily("agentspeed:prefix_cache_tier_hit_tokens",
                                "Prompt tokens served from a KV tier below the pool, by tier", labels=[*labels, "tier"])
        c.add_metric([self._model, "host"], s.num_tier_hit_tokens)  # every load into the pool
        c.add_metric([self._model, "disk"], s.num_disk_hit_tokens)  # of those, read from disk first
        yield c
        c = CounterMetricFamily("agentspeed:spec_decode_disabled_requests",
                                "Requests that would have drafted but decoded without, by reason", labels=[*labels, "reason"])
        c.add_metric([self._model, "structured_output"], s.num_spec_disabled_structured)
        yield c


class Metrics:
    def __init__(self, model: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        lab = ["model_name"]
        r = self.registry
        self.requests = Counter("agentspeed:request_success", "Finished requests by finish reason",
                                ["model_name", "finished_reason"], registry=r)
        self.prompt_tokens = Counter("agentspeed:prompt_tokens", "Prompt tokens received", lab, registry=r)
        self.cached_tokens = Counter("agentspeed:prefix_cache_hit_tokens",
                                     "Prompt tokens served from the prefix cache", lab, registry=r)
        self.generation_tokens = Counter("agentspeed:generation_tokens", "Tokens generated", lab, registry=r)
        self.ttft = Histogram("agentspeed:time_to_first_token_seconds", "Time to first token", lab,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("agentspeed:inter_token_latency_seconds", "Time between output tokens", lab,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("agentspeed:e2e_request_latency_seconds", "Request latency, arrival to finish",
                             lab, buckets=_LATENCY_BUCKETS, registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self.total_prompt_tokens = 0  # plain totals for the load report's cache hit rate
        self.total_cached_tokens = 0
        r.register(_EngineCollector(stats, self.throughput, model))

    def observe_tokens(self, n: int, now: float) -> None:
        self.generation_tokens.labels(self.model).inc(n)
        self._recent.append((now, n))

    def throughput(self, window: float = 10.0) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - window:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / window

    def observe_request(self, finish_reason: str, prompt: int, cached: int, ttft: float | None,
                        itls: list[float], e2e: float) -> None:
        m = self.model
        self.requests.labels(m, finish_reason).inc()
        self.prompt_tokens.labels(m).inc(prompt)
        self.cached_tokens.labels(m).inc(cached)
        self.total_prompt_tokens += prompt
        self.total_cached_tokens += cached
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
        h = self.itl.labels(m)
        for x in itls:
            h.observe(x)
        self.e2e.labels(m).observe(e2e)

    def cache_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache, of all finished requests' prompts."""
        return self.total_cached_tokens / self.total_prompt_tokens if self.total_prompt_tokens else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
