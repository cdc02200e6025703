"""KV-event publisher: the engine's prefix-cache events as SMG's `KvEventBatch` stream.

Contract (smg.grpc.common, SubscribeKvEvents):
- Every engine step that published or evicted pages becomes one batch with the next
  sequence number (1, 2, ...); every subscriber sees every batch in order.
- Each page is a `KvBlock`: its key as a signed 64-bit hash (the first 8 bytes of our SHA-256
  page key, little-endian), its token ids and the page size; a run of pages stored together
  is one `KvBlocksStored` whose `parent_block_hash` is the page before the run (absent for
  a prompt's first page). Evictions are `KvBlocksRemoved` with the same hashes.
- Every batch carries the worker's load record; while nothing is stored or evicted the
  stream sends a `load_only` heartbeat every HEARTBEAT_S (SMG takes a worker that says
  nothing for 2 s as stale), repeating the last sequence number sent on that stream.
- A subscriber that asks to resume from sequence S gets the batches from S on if the bounded
  history still holds them; one that asks for 0 gets the whole history when it still reaches
  back to batch 1 (the cache's full state then), else live batches only.
- A subscriber too slow to take HISTORY batches is dropped (its stream ends); the gateway
  resubscribes with its cursor.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from smg_grpc_proto.generated import common_pb2

from agentspeed.control.kv_events import KvEvent, PagesRemoved, PagesStored
from agentspeed.control.prefix_cache import PageKey

HEARTBEAT_S = 0.5
HISTORY = 4096  # batches kept for subscribers that resume, and a slow subscriber's backlog limit
HISTORY_BLOCKS = 1 << 16  # ... and at most this many pages in them (1M tokens at page size 16)

LoadFn = Callable[[int, bool, bool], common_pb2.EngineLoad]  # (sample, load_only, full)


def block_hash(key: PageKey) -> int:
    return int.from_bytes(key[:8], "little", signed=True)


def to_proto(event: KvEvent, event_id: int, medium: str) -> common_pb2.KvCacheEvent:
    if isinstance(event, PagesStored):
        ps = event.page_size
        blocks = [common_pb2.KvBlock(block_hash=block_hash(k), token_ids=event.tokens[i * ps : (i + 1) * ps],
                                     block_size=ps) for i, k in enumerate(event.keys)]
        stored = common_pb2.KvBlocksStored(blocks=blocks, tier=common_pb2.KV_CACHE_TIER_DEVICE,
                                           medium=medium, group_idx=0, locality=common_pb2.KV_CACHE_LOCALITY_LOCAL)
        if event.parent is not None:
            stored.parent_block_hash = block_hash(event.parent)
        return common_pb2.KvCacheEvent(event_id=event_id, stored=stored)
    assert isinstance(event, PagesRemoved)
    return common_pb2.KvCacheEvent(event_id=event_id, removed=common_pb2.KvBlocksRemoved(
        block_hashes=[block_hash(k) for k in event.keys], tier=common_pb2.KV_CACHE_TIER_DEVICE, medium=medium,
        group_idx=0))


class KvEventPublisher:
    def __init__(self, load: LoadFn, medium: str = "cpu") -> None:
        self._load = load
        self._medium = medium
        self.sequence = 0  # of the last batch published
        self._event_ids = 0
        self._samples = 0
        self._history: deque[tuple[common_pb2.KvEventBatch, int]] = deque()  # (batch, its pages)
        self._history_blocks = 0
        self._subscribers: set[asyncio.Queue[common_pb2.KvEventBatch | None]] = set()

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, events: list[KvEvent]) -> None:
        """One engine step's events (AsyncLLM.kv_event_listeners; runs on the event loop)."""
        if not events:
            return
        self.sequence += 1
        protos = []
        for e in events:
            self._event_ids += 1
            protos.append(to_proto(e, self._event_ids, self._medium))
        batch = common_pb2.KvEventBatch(sequence_number=self.sequence, timestamp=time.time(), events=protos,
                                        dp_rank=0)
        n = sum(len(e.keys) for e in events)
        self._history.append((batch, n))
        self._history_blocks += n
        while len(self._history) > HISTORY or (self._history_blocks > HISTORY_BLOCKS and len(self._history) > 1):
            self._history_blocks -= self._history.popleft()[1]
        for q in list(self._subscribers):
            if q.qsize() >= HISTORY:  # too slow: end its stream, it resubscribes with its cursor
                self._subscribers.discard(q)
                q.put_nowait(None)
            else:
                q.put_nowait(batch)

    def _with_load(self, batch: common_pb2.KvEventBatch, load_only: bool, full: bool) -> common_pb2.KvEventBatch:
        self._samples += 1
        out = common_pb2.KvEventBatch()
        out.CopyFrom(batch)
        out.load.CopyFrom(self._load(self._samples, load_only, full))
        return out

    def _heartbeat(self, sequence: int, full: bool = True) -> common_pb2.KvEventBatch:
        return self._with_load(common_pb2.KvEventBatch(sequence_number=sequence, timestamp=time.time(), dp_rank=0),
                               True, full)

    async def subscribe(self, start_sequence: int, load_first: bool) -> AsyncIterator[common_pb2.KvEventBatch]:
        q: asyncio.Queue[common_pb2.KvEventBatch | None] = asyncio.Queue()
        self._subscribers.add(q)
        try:
            last = 0
            if load_first:
                yield self._heartbeat(0)
            oldest = self._history[0][0].sequence_number if self._history else self.sequence + 1
            start = start_sequence if start_sequence > 0 else (1 if oldest == 1 else self.sequence + 1)
            first = True
            for b, _ in list(self._history):
                if b.sequence_number >= start:
                    yield self._with_load(b, False, first)
                    first = False
                    last = b.sequence_number
            while True:
                try:
                    b = await asyncio.wait_for(q.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield self._heartbeat(last)
                    continue
                if b is None:
                    return
                if b.sequence_number <= last:  # already replayed from the history
                    continue
                yield self._with_load(b, False, first)
                first = False
                last = b.sequence_number
        finally:
            self._subscribers.discard(q)
