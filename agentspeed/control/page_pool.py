"""The KV page pool: the only owner of page state.

Each page (0 is the null page, never handed out) is exactly one of
  free       refcount 0, on the free list
  owned      refcount 1, held by one block table, being written, not in the prefix index
  published  full and immutable, in the prefix index, refcount >= 1 (shared)
  cached     published with refcount 0: evictable, in LRU order
A page's refcount counts the live block tables holding it plus the fences holding it.
Fences keep pages that an in-flight step reads or writes from being reused: a handle given
back while step S is in flight releases its pages into S's fence, and they only become
free/cached when S's result has been advanced (`clear_fence(S)`).
All operations are O(1) per page.
"""

from __future__ import annotations

from collections import OrderedDict
from enum import IntEnum

from agentspeed.control.errors import HandleReleased, InvariantViolation, OutOfPages
from agentspeed.control.kv_events import KvEventLog
from agentspeed.control.prefix_cache import PageKey


class PageState(IntEnum):
    FREE = 0
    OWNED = 1
    PUBLISHED = 2
    CACHED = 3


class BlockTable:
    """An opaque handle on a request's pages, in position order. Only the pool mutates it;
    once given back, every access raises HandleReleased."""

    __slots__ = ("_pages", "_released")

    def __init__(self) -> None:
        self._pages: list[int] = []
        self._released = False

    @property
    def pages(self) -> list[int]:
        """The page ids (a copy is not made: callers must not mutate)."""
        if self._released:
            raise HandleReleased("block table used after it was released")
        return self._pages

    @property
    def released(self) -> bool:
        return self._released

    def __len__(self) -> int:
        return len(self.pages)


class PagePool:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError("a page pool needs the null page and at least one more")
        self.num_pages = num_pages
        self.page_size = page_size
        self.state = [PageState.FREE] * num_pages
        self.refcount = [0] * num_pages
        self.page_hash: list[PageKey | None] = [None] * num_pages
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # pop() gives low ids first
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages, oldest first
        self._index: dict[PageKey, int] = {}  # prefix key -> published/cached page
        self._fences: dict[int, list[int]] = {}  # step id -> pages held for it
        self._tables: set[BlockTable] = set()  # live handles, for check_invariants
        self.state[0] = PageState.OWNED  # the null page is permanently taken
        self.refcount[0] = 1
        self.evictions = 0
        self.events = KvEventLog()  # evictions are reported here when enabled

    # ---- capacity ---------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    def num_available(self) -> int:
        """Pages an allocation can obtain now: free plus evictable cached."""
        return len(self._free) + len(self._lru)

    def num_free(self) -> int:
        return len(self._free)

    def num_in_use(self) -> int:
        """Pages held by block tables or fences (not free, not merely cached)."""
        return self.num_usable - len(self._free) - len(self._lru)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_available()

    # ---- handles ------------------------------------------------------------------------
    def new_table(self) -> BlockTable:
        bt = BlockTable()
        self._tables.add(bt)
        return bt

    def allocate(self, bt: BlockTable, n: int) -> None:
        """Append n fresh owned pages to bt, evicting least-recently-used cached pages when
        the free list runs out. Raises OutOfPages (and changes nothing) if it cannot."""
        pages = bt.pages
        if n > self.num_available():
            raise OutOfPages(f"need {n} pages, {self.num_available()} available")
        for _ in range(n):
            if not self._free:
                self._evict_one()
            p = self._free.pop()
            self.state[p] = PageState.OWNED
            self.refcount[p] = 1
            pages.append(p)

    def skip(self, bt: BlockTable, n: int) -> None:
        """Append n null-page entries to bt: positions no step will read through it (the
        pages before a sliding window)."""
        bt.pages.extend([0] * n)

    def drop(self, bt: BlockTable, lo: int, hi: int, fence: int | None = None) -> None:
        """Give back bt's pages [lo, hi) and leave null entries in their place (a sliding
        window moved past them). With a fence they stay held until clear_fence(fence)."""
        pages = bt.pages
        gone = [p for p in pages[lo:hi] if p]
        pages[lo:hi] = [0] * (hi - lo)
        if fence is not None:
            self._fences.setdefault(fence, []).extend(gone)
        else:
            for p in reversed(gone):
                self._unref(p)

    def share(self, bt: BlockTable, page: int) -> None:
        """Append a published or cached page (a prefix-cache hit) to bt."""
        st = self.state[page]
        if st == PageState.CACHED:
            del self._lru[page]
            self.state[page] = PageState.PUBLISHED
        elif st != PageState.PUBLISHED:
            raise InvariantViolation(f"page {page} shared while {st.name}")
        self.refcount[page] += 1
        bt.pages.append(page)

    def release(self, bt: BlockTable, fence: int | None = None) -> None:
        """Give back every page of bt and invalidate it. With a fence (the id of a step in
        flight), the pages stay held until clear_fence(fence)."""
        pages = [p for p in bt.pages if p]
        bt._released = True
        self._tables.discard(bt)
        if fence is not None:
            self._fences.setdefault(fence, []).extend(pages)
        else:
            for p in reversed(pages):  # tail pages first: they become LRU-oldest
                self._unref(p)

    def clear_fence(self, fence: int) -> None:
        for p in reversed(self._fences.pop(fence, [])):
            self._unref(p)

    def _unref(self, p: int) -> None:
        self.refcount[p] -= 1
        if self.refcount[p] > 0:
            return
        if self.state[p] == PageState.PUBLISHED:
            self.state[p] = PageState.CACHED
            self._lru[p] = None
        else:
            self.state[p] = PageState.FREE
            self._free.append(p)

    def _evict_one(self) -> None:
        p, _ = self._lru.popitem(last=False)
        h = self.page_hash[p]
        assert h is not None
        del self._index[h]
        self.page_hash[p] = None
        self.state[p] = PageState.FREE
        self._free.append(p)
        self.evictions += 1
        if self.events.enabled:
            self.events.removed(h)

    # ---- prefix index -------------------------------------------------------------------
    def publish(self, page: int, h: PageKey) -> bool:
        """Make a full owned page immutable and findable under hash h. Returns False (and
        leaves the page owned) if another page already holds that hash."""
        if self.state[page] != PageState.OWNED or page == 0:
            raise InvariantViolation(f"publish of page {page} in state {self.state[page].name}")
        if h in self._index:
            return False
        self.state[page] = PageState.PUBLISHED
        self.page_hash[page] = h
        self._index[h] = page
        return True

    def lookup(self, h: PageKey) -> int | None:
        return self._index.get(h)

    def touch(self, page: int) -> None:
        """Mark a cached page recently used."""
        if page in self._lru:
            self._lru.move_to_end(page)

    def drop_cache(self) -> None:
        """Evict every cached page (e.g. to measure with a cold cache)."""
        while self._lru:
            self._evict_one()

    # ---- invariants ---------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every page is in exactly one state, consistent with the free list, LRU and index,
        and its refcount equals the number of live handles plus fences holding it."""
        holders = [0] * self.num_pages
        holders[0] = 1
        for bt in self._tables:
            if bt.released:
                raise InvariantViolation("a released handle is still registered")
            for p in bt.pages:
                holders[p] += 1
        for pages in self._fences.values():
            for p in pages:
                holders[p] += 1
        free = set(self._free)
        if len(free) != len(self._free):
            raise InvariantViolation("a page is on the free list twice")
        for p in range(1, self.num_pages):
            st, rc = self.state[p], self.refcount[p]
            if rc != holders[p]:
                raise InvariantViolation(f"page {p}: refcount {rc} but {holders[p]} holders")
            if (p in free) != (st == PageState.FREE):
                raise InvariantViolation(f"page {p}: state {st.name} vs free list")
            if (p in self._lru) != (st == PageState.CACHED):
                raise InvariantViolation(f"page {p}: state {st.name} vs LRU")
            indexed = self.page_hash[p] is not None and self._index.get(self.page_hash[p]) == p  # type: ignore[arg-type]
            if indexed != (st in (PageState.PUBLISHED, PageState.CACHED)):
                raise InvariantViolation(f"page {p}: state {st.name} vs prefix index")
            if st == PageState.FREE and rc != 0:
                raise InvariantViolation(f"free page {p} has refcount {rc}")
            if st == PageState.OWNED and rc != 1:
                raise InvariantViolation(f"owned page {p} has refcount {rc}")
            if st == PageState.PUBLISHED and rc < 1:
                raise InvariantViolation(f"published page {p} has refcount 0")
            if st == PageState.CACHED and rc != 0:
                raise InvariantViolation(f"cached page {p} has refcount {rc}")
        if len(self._index) != sum(
            1 for p in range(1, self.num_pages) if self.state[p] in (PageState.PUBLISHED, PageState.CACHED)
        ):
            raise InvariantViolation("prefix index holds pages that are not published")
