"""The disk tier below the host tier: one file per page copy, checksummed.

A host copy about to be reused is spilled here (a SPILL of the plan's tier_ops): its bytes are taken
from the host slot at once (the slot is overwritten later in the same step) and written by a
background thread, off the step's critical path. A read (FETCH) waits for a pending
write of its file, then checks the header — magic, the page's prefix key, the length and a
BLAKE2b digest of the payload — before filling the host slot; any mismatch, a missing or a
short file is reported as failed and those tokens are recomputed: a disk copy never yields
wrong tokens, only a miss. Files live in DIR/rank<r>/<slot>.kv; ones left by an earlier run
are deleted at start (the index that found them is gone with that run).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from hashlib import blake2b
from pathlib import Path

from agentspeed.execution.kv_tier import HostKVTier

log = logging.getLogger(__name__)

MAGIC = b"ASKV1"
HEADER = struct.Struct("<5s32sQ16s")  # magic, prefix key, payload bytes, BLAKE2b-128 of the payload


def _digest(data: bytes | memoryview) -> bytes:
    return blake2b(data, digest_size=16).digest()


class DiskKVTier:
    def __init__(self, host: HostKVTier, directory: str, num_slots: int, rank: int = 0) -> None:
        self.host = host
        self.num_slots = num_slots
        self.dir = Path(directory) / f"rank{rank}"
        self.dir.mkdir(parents=True, exist_ok=True)
        stale = list(self.dir.glob("*.kv")) + list(self.dir.glob("*.tmp"))
        for f in stale:
            f.unlink(missing_ok=True)
        if stale:
            log.info("KV disk tier: removed %d files of an earlier run from %s", len(stale), self.dir)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="agentspeed-kv-disk")
        self._pending: dict[int, Future[None]] = {}  # disk slot -> its latest write

    @staticmethod
    def slots_for(host: HostKVTier, disk_bytes: int) -> int:
        """How many page files fit in disk_bytes."""
        return disk_bytes // (host.page_bytes + HEADER.size)

    def path(self, slot: int) -> Path:
        return self.dir / f"{slot}.kv"

    def spill(self, ops: Sequence[tuple[int, int, bytes]]) -> None:
        """(host slot, disk slot, key): write these host copies to their files."""
        for hslot, dslot, key in ops:
            data = self.host.read_slot(hslot)
            self._pending[dslot] = self._writer.submit(self._write, dslot, key, data)
        if len(self._pending) > 4096:
            self._pending = {d: f for d, f in self._pending.items() if not f.done()}

    def _write(self, dslot: int, key: bytes, data: bytes) -> None:
        path = self.path(dslot)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, key, len(data), _digest(data)))
                f.write(data)
            os.replace(tmp, path)  # a reader sees the old file or the whole new one
        except OSError as e:  # (the read will fail its checks: a miss, not wrong tokens)
            log.warning("KV disk tier: writing %s failed: %s", path, e)
            path.unlink(missing_ok=True)

    def fetch(self, ops: Sequence[tuple[int, int, bytes]]) -> list[int]:
        """(disk slot, host slot, key): read these files into their host slots; returns the
        host slots whose file was missing or failed a check (left unfilled)."""
        failed = []
        for dslot, hslot, key in ops:
            pending = self._pending.pop(dslot, None)
            if pending is not None:
                pending.result()
            if not self._read(dslot, hslot, key):
                failed.append(hslot)
        return failed

    def _read(self, dslot: int, hslot: int, key: bytes) -> bool:
        path = self.path(dslot)
        try:
            data = path.read_bytes()
        except OSError:
            log.warning("KV disk tier: %s is missing: recomputing its tokens", path)
            return False
        if len(data) >= HEADER.size:
            magic, k, n, digest = HEADER.unpack_from(data)
            body = memoryview(data)[HEADER.size :]
            if magic == MAGIC and k == key and n == len(body) and _digest(body) == digest:
                self.host.write_slot(hslot, body)
                return True
        log.warning("KV disk tier: %s is corrupt or not this page's: recomputing its tokens", path)
        return False

    def shutdown(self) -> None:
        self._writer.shutdown(wait=True)
