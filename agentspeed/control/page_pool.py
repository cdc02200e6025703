"""The KV page pool: the only owner of page state.

Each page (0 is the null page, never handed out) is exactly one of
  free       refcount 0, on the free list
  owned      refcount 1, held by one block table, being written, not in the prefix index
  published  full and immutable, in the prefix index, refcount >= 1 (shared)
  cached     published with refcount 0: evictable, in LRU order within its group
A page's refcount counts the live block tables holding it plus the fences holding it.
Fences keep pages that an in-flight step reads or writes from being reused: a handle given
back while step S is in flight releases its pages into S's fence, and they only become
free/cached when S's result has been advanced (`clear_fence(S)`).
Cached pages are grouped by the session that gave them back last (None: no session); an
eviction policy (control/retention.py) orders the groups, plain LRU when there is none.
A published page is either full (its key is a prefix-cache key) or partial: the last,
partly filled page of a finished turn, findable by its parent's key and its tokens, which a
later request whose tokens continue them takes over whole (`claim`) while it is cached.
All operations are O(1) per page (eviction: O(groups) once per allocation).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
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
        # cached pages by group (session key or None), oldest first within a group
        self._cached: dict[str | None, OrderedDict[int, None]] = {}
        self._n_cached = 0
        self.page_group: list[str | None] = [None] * num_pages  # of the last table to give it back
        self._index: dict[PageKey, int] = {}  # prefix key -> published/cached full page
        # partial pages: parent key -> {page: its tokens}
        self._partial: dict[PageKey, dict[int, tuple[int, ...]]] = {}
        self._partial_of: dict[int, PageKey] = {}  # partial page -> its parent key
        # the groups' eviction order (control/retention.py); None: group None first, then by age
        self.eviction_order: Callable[[Collection[str | None]], list[str | None]] | None = None
        # told of every full page evicted (page, key) while its KV is still intact: the
        # scheduler copies it to the host tier (control/tier.py)
        self.on_evict: Callable[[int, PageKey], None] | None = None
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
        return len(self._free) + self._n_cached

    def num_free(self) -> int:
        return len(self._free)

    def num_in_use(self) -> int:
        """Pages held by block tables or fences (not free, not merely cached)."""
        return self.num_usable - len(self._free) - self._n_cached

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
        order: list[str | None] | None = None
        for _ in range(n):
            if not self._free:
                if order is None:
                    order = self._order()
                while not self._cached.get(order[0]):
                    order.pop(0)
                self._evict_one(order[0])
            p = self._free.pop()
            self.state[p] = PageState.OWNED
            self.refcount[p] = 1
            pages.append(p)

    def skip(self, bt: BlockTable, n: int) -> None:
        """Append n null-page entries to bt: positions no step will read through it (the
        pages before a sliding window)."""
        bt.pages.extend([0] * n)

    def drop(self, bt: BlockTable, lo: int, hi: int, fence: int | None = None, group: str | None = None) -> None:
        """Give back bt's pages [lo, hi) and leave null entries in their place (a sliding
        window moved past them). With a fence they stay held until clear_fence(fence)."""
        pages = bt.pages
        gone = [p for p in pages[lo:hi] if p]
        pages[lo:hi] = [0] * (hi - lo)
        for p in gone:
            self.page_group[p] = group
        if fence is not None:
            self._fences.setdefault(fence, []).extend(gone)
        else:
            for p in reversed(gone):
                self._unref(p)

    def share(self, bt: BlockTable, page: int) -> None:
        """Append a published or cached page (a prefix-cache hit) to bt."""
        st = self.state[page]
        if page in self._partial_of:
            raise InvariantViolation(f"partial page {page} shared (a partial page is only claimed)")
        if st == PageState.CACHED:
            self._uncache(page)
            self.state[page] = PageState.PUBLISHED
        elif st != PageState.PUBLISHED:
            raise InvariantViolation(f"page {page} shared while {st.name}")
        self.refcount[page] += 1
        bt.pages.append(page)

    def release(self, bt: BlockTable, fence: int | None = None, group: str | None = None) -> None:
        """Give back every page of bt and invalidate it. With a fence (the id of a step in
        flight), the pages stay held until clear_fence(fence). Pages that become cached join
        `group` (the last group to give a shared page back decides)."""
        pages = [p for p in bt.pages if p]
        bt._released = True
        self._tables.discard(bt)
        for p in pages:
            self.page_group[p] = group
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
            g = self.page_group[p]
            lru = self._cached.get(g)
            if lru is None:
                lru = self._cached[g] = OrderedDict()
            lru[p] = None
            self._n_cached += 1
        else:
            self.state[p] = PageState.FREE
            self._free.append(p)

    def _uncache(self, p: int) -> None:
        g = self.page_group[p]
        lru = self._cached[g]
        del lru[p]
        if not lru:
            del self._cached[g]
        self._n_cached -= 1

    def _order(self) -> list[str | None]:
        if self.eviction_order is not None:
            return self.eviction_order(list(self._cached))
        return sorted(self._cached, key=lambda g: g is not None)  # group None (no sessions) first

    def next_victims(self, n: int) -> list[int]:
        """The first n full cached pages in eviction order (what allocations would evict
        next, partial pages aside), evicting nothing."""
        out: list[int] = []
        if n <= 0 or not self._n_cached:
            return out
        for g in self._order():
            for p in self._cached.get(g, ()):
                if p not in self._partial_of:
                    out.append(p)
                    if len(out) == n:
                        return out
        return out

    def _evict_one(self, group: str | None) -> None:
        lru = self._cached[group]
        p = next(iter(lru))
        self._uncache(p)
        self.evictions += 1
        self.state[p] = PageState.FREE
        self._free.append(p)
        if p in self._partial_of:
            self._unindex_partial(p)
            return
        h = self.page_hash[p]
        assert h is not None
        del self._index[h]
        self.page_hash[p] = None
        if self.on_evict is not None:
            self.on_evict(p, h)
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
        """Mark a cached page recently used (within its group)."""
        if self.state[page] == PageState.CACHED:
            self._cached[self.page_group[page]].move_to_end(page)

    def groups(self) -> list[str | None]:
        """The groups holding cached pages."""
        return list(self._cached)

    def drop_cache(self) -> None:
        """Evict every cached page (e.g. to measure with a cold cache)."""
        while self._cached:
            self._evict_one(next(iter(self._cached)))

    # ---- partial pages --------------------------------------------------------------------
    def publish_partial(self, page: int, parent: PageKey, tokens: Sequence[int]) -> None:
        """Make an owned page holding `tokens` (fewer than a page) after the prefix keyed
        `parent` findable by `match_partial` once it is cached. Its table still holds it."""
        if self.state[page] != PageState.OWNED or page == 0 or not 0 < len(tokens) < self.page_size:
            raise InvariantViolation(f"partial publish of page {page} in state {self.state[page].name}")
        self.state[page] = PageState.PUBLISHED
        self._partial.setdefault(parent, {})[page] = tuple(tokens)
        self._partial_of[page] = parent

    def match_partial(self, parent: PageKey, tokens: Sequence[int]) -> tuple[int, int]:
        """(page, n): the cached partial page after `parent` whose leading n >= 1 tokens equal
        tokens[:n], n the longest; (0, 0) if none."""
        best, best_n = 0, 0
        for page, toks in self._partial.get(parent, {}).items():
            if self.state[page] != PageState.CACHED:
                continue
            n = 0
            for a, b in zip(toks, tokens, strict=False):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = page, n
        return best, best_n

    def claimable(self, page: int) -> bool:
        """A cached partial page (claim would take it)."""
        return self.state[page] == PageState.CACHED and page in self._partial_of

    def claim(self, bt: BlockTable, page: int) -> None:
        """Append a cached partial page to bt as an owned page: bt's request keeps its leading
        tokens' KV and overwrites the rest (no copy: a cached page has no other holder)."""
        if not self.claimable(page):
            raise InvariantViolation(f"claim of page {page} in state {self.state[page].name}")
        self._uncache(page)
        self._unindex_partial(page)
        self.state[page] = PageState.OWNED
        self.refcount[page] = 1
        bt.pages.append(page)

    def _unindex_partial(self, p: int) -> None:
        parent = self._partial_of.pop(p)
        entries = self._partial[parent]
        del entries[p]
        if not entries:
            del self._partial[parent]

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
            grouped = p in self._cached.get(self.page_group[p], ())
            if grouped != (st == PageState.CACHED):
                raise InvariantViolation(f"page {p}: state {st.name} vs its group's LRU")
            if p in self._partial_of:
                if p not in self._partial.get(self._partial_of[p], {}) or self.page_hash[p] is not None:
                    raise InvariantViolation(f"partial page {p} is not indexed as one")
                indexed = True
            else:
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
        if len(self._index) + len(self._partial_of) != sum(
            1 for p in range(1, self.num_pages) if self.state[p] in (PageState.PUBLISHED, PageState.CACHED)
        ):
            raise InvariantViolation("prefix index holds pages that are not published")
        if self._n_cached != sum(len(v) for v in self._cached.values()) or any(not v for v in self._cached.values()):
            raise InvariantViolation("cached-page count or groups out of step")
        if sum(len(v) for v in self._partial.values()) != len(self._partial_of):
            raise InvariantViolation("partial index out of step")
