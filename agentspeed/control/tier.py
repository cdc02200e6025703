"""The index of a KV tier below the device pool (the host tier, and the disk tier below
it): which full prefix pages have a copy there, and in which slot.

A slot is free or holds the copy of one full page, found by the page's prefix key, in LRU
order. The scheduler asks for a slot when the level above evicts a full page (`store`) and
looks keys up when a prefix misses above (`lookup`); the copies themselves are made by the
execution plane from the plan's tier operations (control/plan.py), which it runs before the
plan's forward in a fixed order. The hazard is reusing a slot an operation of a step not yet
advanced still reads or writes: such an operation pins its slot until that step is advanced
(a fence, as in the page pool), and `store` never takes a pinned slot. A slot `store` takes
from another key is reported to `on_evict` first (the host tier spills it to disk). The
tier is inclusive: a loaded copy stays, so a page evicted again later needs no second copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

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
        self.evictions = 0  # copies dropped to make room, since start
        self.on_evict: Callable[[PageKey, int], None] | None = None  # (key, slot) about to be reused

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
            if self.on_evict is not None:
                self.on_evict(victim, slot)
        self._lru[key] = slot
        self.key_of[slot] = key
        self.stores += 1
        return slot

    def pin(self, slot: int, step: int) -> None:
        """Keep `slot` from reuse until step `step` (whose plan reads or writes it) is advanced,
        and make it the most recently used."""
        key = self.key_of[slot]
        if key is None:
            raise InvariantViolation(f"pin of empty tier slot {slot}")
        self.pins[slot] += 1
        self._fences.setdefault(step, []).append(slot)
        self._lru.move_to_end(key)

    def unpin(self, slot: int, step: int) -> None:
        """Undo the last `pin(slot, step)` (the operation it was for is not planned)."""
        fence = self._fences.get(step)
        if not fence or fence[-1] != slot:
            raise InvariantViolation(f"unpin of tier slot {slot} not last pinned by step {step}")
        fence.pop()
        if not fence:
            del self._fences[step]
        self.pins[slot] -= 1

    def fenced(self, step: int) -> bool:
        """Whether step `step` pins any slot."""
        return step in self._fences

    def drop(self, key: PageKey) -> None:
        """Forget the copy of `key` (it failed to read back), if it is still here."""
        slot = self._lru.pop(key, None)
        if slot is None:
            return
        if self.pins[slot]:
            raise InvariantViolation(f"drop of pinned tier slot {slot}")
        self.key_of[slot] = None
        self._free.append(slot)

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


@dataclass(slots=True)
class TierCost:
    """When bringing pages back from a tier beats recomputing them (the swap decision, for
    prefix hits and preempted requests alike).

    Per page: loading from the host tier costs load_s; from disk fetch_s + load_s (and the
    request waits a step for the read); recomputing costs page_size * prefill_s, prefill_s
    being the seconds per token of prefill-sized steps. All three are measured by the engine
    (EWMA of what the copies and forwards took; rank 0's figures under TP, so every rank
    decides alike). A tier is used while its cost per page is below recomputing one; a cost
    not measured yet counts as cheaper, so the first hits measure it. Recompute cost per
    token grows with the context (attention) and this average does not: it is a lower bound
    for long prefixes, which can only favour recomputing where loading was in fact cheaper.
    Measured on the 2-core CPU (SmolLM2-135M, `benchmarks/kv_tier_copy.py`): an int8 host load
    0.29 ms per page, a disk read 1.2 ms, recomputing 30 ms (1.9 ms per prefill token), so
    the tiers win by 20-100x there; the model matters for slow disks and tiny models."""

    ALPHA: ClassVar[float] = 0.2

    load_s: float | None = None
    fetch_s: float | None = None
    prefill_s: float | None = None

    @staticmethod
    def _ewma(old: float | None, seconds: float, n: int) -> float:
        x = seconds / n
        return x if old is None else old + TierCost.ALPHA * (x - old)

    def observe(self, load: tuple[float, int], fetch: tuple[float, int], prefill: tuple[float, int]) -> None:
        """(seconds, pages) of a step's loads and disk reads, (seconds, tokens) of its forward
        if it was prefill-sized; zero counts leave an estimate as it was."""
        if load[1]:
            self.load_s = self._ewma(self.load_s, *load)
        if fetch[1]:
            self.fetch_s = self._ewma(self.fetch_s, *fetch)
        if prefill[1]:
            self.prefill_s = self._ewma(self.prefill_s, *prefill)

    def use_host(self, page_size: int) -> bool:
        return self.load_s is None or self.prefill_s is None or self.load_s < page_size * self.prefill_s

    def use_disk(self, page_size: int) -> bool:
        if self.fetch_s is None or self.prefill_s is None:
            return self.use_host(page_size)
        return self.fetch_s + (self.load_s or 0.0) < page_size * self.prefill_s
