"""The index of the host KV tier: which full prefix pages have a copy below the device pool,
and in which slot.

A slot is free or holds the copy of one full page, found by the page's prefix key, in LRU
order. The scheduler asks for a slot when the pool evicts a full page (`store`) and looks
keys up when a prefix misses in the pool (`lookup`); the copies themselves are made by the
execution plane from the plan's kv_stores and kv_loads (control/plan.py), which it runs
before the plan's forward, stores first. So a slot assigned in a plan may be loaded in the
same plan, and the one hazard is reusing a slot whose load has not run yet: a load pins its
slot until the step carrying it is advanced (a fence, as in the page pool), and `store`
never takes a pinned slot. The tier is inclusive: a loaded copy stays, so a page evicted
again later needs no second copy.
"""

from __future__ import annotations

from collections import OrderedDict

from agentspeed.control.errors import InvariantViolation
from agentspeed.control.prefix_cache import PageKey


class TierIndex:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("a KV tier needs at least one slot")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._lru: OrderedDict[PageKey, int] = OrderedDict()  # stored key -> slot, oldest first
        self.key_of: list[PageKey | None] = [None] * num_slots
        self.pins = [0] * num_slots  # loads of the slot not yet advanced
        self._fences: dict[int, list[int]] = {}  # step id -> slots its loads read
        self.stores = 0  # copies made (planned), since start
        self.loads = 0  # pages loaded back, since start
        self.evictions = 0  # copies dropped to make room, since start

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, key: PageKey) -> int | None:
        return self._lru.get(key)

    def store(self, key: PageKey) -> int | None:
        """The slot to copy the page keyed `key` into, making it the most recently used: a
        free slot, else the least recently used unpinned one (its copy is dropped). None when
        the tier holds the key already (it only becomes most recent) or every slot is pinned."""
        if key in self._lru:
            self._lru.move_to_end(key)
            return None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k, s in self._lru.items() if not self.pins[s]), None)
            if victim is None:
                return None
            slot = self._lru.pop(victim)
            self.evictions += 1
        self._lru[key] = slot
        self.key_of[slot] = key
        self.stores += 1
        return slot

    def pin(self, slot: int, step: int) -> None:
        """Keep `slot` from reuse until step `step` (whose plan loads it) is advanced."""
        if self.key_of[slot] is None:
            raise InvariantViolation(f"load of empty tier slot {slot}")
        self.pins[slot] += 1
        self._fences.setdefault(step, []).append(slot)
        self._lru.move_to_end(self.key_of[slot])  # type: ignore[arg-type]
        self.loads += 1

    def clear_fence(self, step: int) -> None:
        for slot in self._fences.pop(step, ()):
            self.pins[slot] -= 1

    def clear(self) -> int:
        """Drop every copy no load is waiting for; returns how many."""
        gone = [k for k, s in self._lru.items() if not self.pins[s]]
        for k in gone:
            slot = self._lru.pop(k)
            self.key_of[slot] = None
            self._free.append(slot)
        return len(gone)

    def check_invariants(self) -> None:
        """Every slot is free xor holds one indexed key; pins equal the fenced loads."""
        free = set(self._free)
        if len(free) != len(self._free) or len(free) + len(self._lru) != self.num_slots:
            raise InvariantViolation("tier slots lost or listed twice")
        for key, slot in self._lru.items():
            if slot in free or self.key_of[slot] != key:
                raise InvariantViolation(f"tier slot {slot} is both free and stored, or misindexed")
        if any(self.key_of[s] is not None for s in free):
            raise InvariantViolation("a free tier slot keeps a key")
        pins = [0] * self.num_slots
        for slots in self._fences.values():
            for s in slots:
                pins[s] += 1
        if pins != self.pins:
            raise InvariantViolation("tier pins out of step with the loads in flight")
        if any(self.pins[s] for s in free):
            raise InvariantViolation("a pinned tier slot is free")
