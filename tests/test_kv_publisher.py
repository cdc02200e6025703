"""The KV-event publisher without a server: numbering, resume from a cursor, the bounded
history, heartbeats, and the proto shape of stored/removed pages."""

from __future__ import annotations

import asyncio

import pytest
from smg_grpc_proto.generated import common_pb2

from agentspeed.control.kv_events import PagesRemoved, PagesStored
from agentspeed.entrypoints.grpc import kv_publisher
from agentspeed.entrypoints.grpc.kv_publisher import KvEventPublisher, block_hash


def _load(sample: int, load_only: bool, full: bool) -> common_pb2.EngineLoad:
    return common_pb2.EngineLoad(running_requests=1, sample=sample, load_only=load_only)


def _stored(i: int) -> PagesStored:
    return PagesStored([bytes([i]) * 32, bytes([i + 100]) * 32], bytes([i - 1]) * 32 if i else None,
                       list(range(8)), 4)


async def _take(pub: KvEventPublisher, start: int, n: int, load_first: bool = False) -> list[common_pb2.KvEventBatch]:
    out = []
    gen = pub.subscribe(start, load_first)
    async for b in gen:
        out.append(b)
        if len(out) == n:
            break
    await gen.aclose()
    return out


def test_batches_are_numbered_and_resumable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_publisher, "HEARTBEAT_S", 0.05)
    pub = KvEventPublisher(_load)
    for i in range(5):
        pub.publish([_stored(i)])
    pub.publish([PagesRemoved([bytes([0]) * 32])])
    pub.publish([])  # no events: no batch
    assert pub.sequence == 6
    got = asyncio.run(_take(pub, 4, 4))
    assert [b.sequence_number for b in got] == [4, 5, 6, 6]  # then a heartbeat repeating the last
    assert got[-1].load.load_only and not got[0].load.load_only and got[0].load.running_requests == 1
    first = asyncio.run(_take(pub, 0, 2, load_first=True))
    assert first[0].sequence_number == 0 and first[0].load.load_only  # the load record before any batch
    assert first[1].sequence_number == 1  # the history reaches back to batch 1: the whole state
    st = first[1].events[0].stored
    assert [b.block_hash for b in st.blocks] == [block_hash(bytes([0]) * 32), block_hash(bytes([100]) * 32)]
    assert [list(b.token_ids) for b in st.blocks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert not st.HasField("parent_block_hash") and all(b.block_size == 4 for b in st.blocks)
    rm = asyncio.run(_take(pub, 6, 1))[0].events[0].removed
    assert list(rm.block_hashes) == [block_hash(bytes([0]) * 32)]


def test_history_is_bounded_by_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_publisher, "HISTORY_BLOCKS", 6)
    monkeypatch.setattr(kv_publisher, "HEARTBEAT_S", 0.05)
    pub = KvEventPublisher(_load)
    for i in range(10):
        pub.publish([_stored(i)])  # two pages each
    got = asyncio.run(_take(pub, 1, 4))
    # batches 1..7 were dropped; a cursor older than the history gets what is left, whose
    # numbers show the gap to the gateway
    assert [b.sequence_number for b in got] == [8, 9, 10, 10]
    # a fresh subscriber (cursor 0) no longer gets a replay: it is not the whole state
    assert asyncio.run(_take(pub, 0, 1))[0].load.load_only
