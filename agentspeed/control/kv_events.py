"""Prefix-cache events: what the page pool makes findable and what it forgets.

A gateway that routes sessions by cached prefix (SMG's cache_aware policy) keeps its own
index of every replica's cache from these events instead of guessing. The scheduler records
a `PagesStored` when it publishes a full page (its key, its parent's key, its tokens) and
the pool a `PagesRemoved` when it evicts one; the engine ships the batch of each step with
that step's outputs. Only the full-attention pool is reported: a prefix index of a hybrid
model's window layers would promise hits the full layers cannot serve.

The log is off unless a subscriber exists (`KvEventLog.enabled`): the disabled calls are
one attribute test per published or evicted page, not per token.
"""

from __future__ import annotations

import msgspec

from agentspeed.control.prefix_cache import PageKey


class PagesStored(msgspec.Struct, tag=True, frozen=True, gc=False):
    """Consecutive pages of one prefix, in position order: keys[0]'s parent is `parent`
    (None: the first page of a prompt), each later page's parent is the key before it;
    tokens holds page_size token ids per page."""

    keys: list[PageKey]
    parent: PageKey | None
    tokens: list[int]
    page_size: int


class PagesRemoved(msgspec.Struct, tag=True, frozen=True, gc=False):
    keys: list[PageKey]


KvEvent = PagesStored | PagesRemoved


class KvEventLog:
    """Events since the last drain(), oldest first. Consecutive removals coalesce."""

    __slots__ = ("_events", "enabled")

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self._events: list[KvEvent] = []

    def stored(self, keys: list[PageKey], parent: PageKey | None, tokens: list[int], page_size: int) -> None:
        assert len(tokens) == len(keys) * page_size, "a stored event carries whole pages"
        if keys:
            self._events.append(PagesStored(keys, parent, tokens, page_size))

    def removed(self, key: PageKey) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, PagesRemoved):
            last.keys.append(key)
        else:
            self._events.append(PagesRemoved([key]))

    def drain(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events
