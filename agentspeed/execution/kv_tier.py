"""The host KV tier's storage: page-sized slots below the device pool (the index of what
they hold is the scheduler's, control/tier.py). The runner copies evicted pages in
(`store`) and pages a prefix hit needs back out (`load`), before each plan's forward.

Two forms:
  exact  the cache's own values (and fp8 scales), bit for bit: a loaded page is the page
         that was evicted. The default on GPUs, where the tier is host memory (pinned) and
         the copy is the cost of a transfer.
  int8   each token's row of each head (each token's latent under MLA) as int8 with one
         float32 scale (stored * scale = value, scale = max|row| / 127): on a CPU the tier is
         the same memory as the pool, so it only adds capacity compressed — a quarter of an
         fp32 cache's bytes (plus 4 bytes per row), half of a 16-bit one's. The error of a
         value is at most half a step, max|row| / 254; the default on CPUs for float caches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from agentspeed.errors import ConfigError
from agentspeed.modeling.context import LayerKV

log = logging.getLogger(__name__)

TIER_DTYPES = ("auto", "exact", "int8")


def resolve_mode(mode: str, device: str, cache_dtype: torch.dtype) -> str:
    """The tier's form for a cache of cache_dtype on device (see the module docstring)."""
    if mode not in TIER_DTYPES:
        raise ConfigError(f"kv offload dtype must be one of {', '.join(TIER_DTYPES)}, got {mode!r}")
    fp8 = cache_dtype.itemsize == 1
    if mode == "int8" and fp8:
        raise ConfigError("an fp8 KV cache is already one byte per value: its host tier keeps it as it is "
                          "(--kv-offload-dtype exact or auto)")
    if mode == "auto":
        return "int8" if device == "cpu" and not fp8 else "exact"
    return mode


class HostKVTier:
    def __init__(self, layers: list[LayerKV], num_slots: int, mode: str, pin: bool = False) -> None:
        """num_slots pages of every layer's tensors in the given form (resolve_mode); pin:
        page-locked host memory (CUDA caches)."""
        self.mode = mode
        self.num_slots = num_slots
        self._layers = layers
        # per layer, per cache tensor: (values, scales or None) in the tier
        self._bufs: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = []
        for kv in layers:
            self._bufs.append([self._alloc(t, s, pin) for t, s in _tensors(kv)])
        self.page_bytes = self.slot_bytes(layers, mode)
        # a write-back in flight: (pages, slots, host copies, their event) (see begin_store)
        self._pending: tuple[list[int], list[int], list[tuple[torch.Tensor, torch.Tensor | None]] | None,
                             torch.cuda.Event | None] | None = None
        self._side = torch.cuda.Stream(layers[0].k.device) if layers[0].k.is_cuda else None

    @staticmethod
    def slot_bytes(layers: list[LayerKV], mode: str) -> int:
        """Bytes one slot (one page of every layer) takes in this form."""
        total = 0
        for kv in layers:
            for t, s in _tensors(kv):
                row = t[0]
                if mode == "int8":
                    total += row.numel() + row[..., 0].numel() * 4
                else:
                    total += row.numel() * t.element_size() + (s[0].numel() * s.element_size() if s is not None else 0)
        return total

    def _alloc(self, t: torch.Tensor, s: torch.Tensor | None, pin: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (self.num_slots, *t.shape[1:])
        if self.mode == "int8":
            return (torch.empty(shape, dtype=torch.int8, pin_memory=pin),
                    torch.empty(shape[:-1], dtype=torch.float32, pin_memory=pin))
        scale = torch.empty((self.num_slots, *s.shape[1:]), dtype=s.dtype, pin_memory=pin) if s is not None else None
        return torch.empty(shape, dtype=_raw(t).dtype, pin_memory=pin), scale

    def _pairs(self, pages: list[int], slots: list[int]) -> Iterator[tuple[
            torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """(cache tensor, its scales, tier values, tier scales, page ids, slot ids) of every
        layer's tensors, for copies between those pages and slots (pairwise)."""
        p = torch.tensor(pages, dtype=torch.long, device=self._layers[0].k.device)
        sl = torch.tensor(slots, dtype=torch.long)
        for kv, bufs in zip(self._layers, self._bufs, strict=True):
            for (t, s), (buf, sbuf) in zip(_tensors(kv), bufs, strict=True):
                yield t, s, buf, sbuf, p, sl

    def store(self, pages: list[int], slots: list[int]) -> None:
        """Copy device pages into tier slots (pairwise)."""
        self._scatter(self._gather(pages, pin=False), slots)

    def begin_store(self, pages: list[int], slots: list[int]) -> None:
        """Start a write-back of device pages into tier slots (pairwise) that finish_store()
        completes; until then the pages must not be written, nor the slots read. On a GPU the
        device-to-host copy runs on a side stream beside whatever the device runs next; on a
        CPU there is nothing to overlap on the step's thread (a second thread would bring a
        second OpenMP team onto the same cores), so all of it runs in finish_store."""
        assert self._pending is None, "a write-back is already in flight"
        if self._side is None:
            self._pending = (pages, slots, None, None)
            return
        self._side.wait_stream(torch.cuda.current_stream())  # (the pages' last writes)
        with torch.cuda.stream(self._side):
            staged = self._gather(pages, pin=True)
            done = torch.cuda.Event()
            done.record(self._side)
        self._pending = (pages, slots, staged, done)

    def finish_store(self) -> None:
        """Complete the write-back in flight, if any."""
        if self._pending is None:
            return
        pages, slots, staged, done = self._pending
        self._pending = None
        if done is None:
            self.store(pages, slots)
            return
        done.synchronize()
        self._scatter(staged or [], slots)

    def _gather(self, pages: list[int], pin: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each cache tensor's rows of `pages` in the tier's form, on the host (pin: copied
        into page-locked memory without waiting, for a side stream)."""
        p = torch.tensor(pages, dtype=torch.long, device=self._layers[0].k.device)
        out = []
        for kv in self._layers:
            for t, s in _tensors(kv):
                x = _raw(t).index_select(0, p)
                sc = s.index_select(0, p) if s is not None else None
                if self.mode == "int8":
                    x = x.float()
                    sc = x.abs().amax(-1).clamp_min(1e-30) / 127.0
                    x = (x / sc.unsqueeze(-1)).round_().to(torch.int8)
                out.append((_to_host(x, pin), _to_host(sc, pin) if sc is not None else None))
        return out

    def _scatter(self, staged: list[tuple[torch.Tensor, torch.Tensor | None]], slots: list[int]) -> None:
        sl = torch.tensor(slots, dtype=torch.long)
        bufs = [b for layer in self._bufs for b in layer]
        for (x, sc), (buf, sbuf) in zip(staged, bufs, strict=True):
            buf.index_copy_(0, sl, x)
            if sc is not None and sbuf is not None:
                sbuf.index_copy_(0, sl, sc)

    def load(self, slots: list[int], pages: list[int]) -> None:
        """Copy tier slots into device pages (pairwise)."""
        dev = self._layers[0].k.device
        for t, s, buf, sbuf, p, sl in self._pairs(pages, slots):
            x = buf.index_select(0, sl)
            if self.mode == "int8":
                assert sbuf is not None
                x = x.float() * sbuf.index_select(0, sl).unsqueeze(-1)
            dst = _raw(t)
            dst.index_copy_(0, p, x.to(device=dev, dtype=dst.dtype, non_blocking=True))
            if s is not None and sbuf is not None:
                s.index_copy_(0, p, sbuf.index_select(0, sl).to(dev, non_blocking=True))

    def _slot_views(self, slot: int) -> list[torch.Tensor]:
        """The slot's tensors, each as flat bytes (views: writing them writes the slot)."""
        out = []
        for bufs in self._bufs:
            for buf, sbuf in bufs:
                for b in (buf, sbuf):
                    if b is not None:
                        out.append(b[slot].view(torch.uint8).reshape(-1))
        return out

    def read_slot(self, slot: int) -> bytes:
        """A slot's whole copy as bytes (what the disk tier writes)."""
        return b"".join(v.numpy().tobytes() for v in self._slot_views(slot))

    def write_slot(self, slot: int, data: bytes | memoryview) -> None:
        """Fill a slot from read_slot's bytes."""
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        off = 0
        for v in self._slot_views(slot):
            v.copy_(src[off : off + v.numel()])
            off += v.numel()
        if off != len(src):
            raise ValueError(f"a slot is {off} bytes, got {len(src)}")


def _to_host(x: torch.Tensor, pin: bool) -> torch.Tensor:
    if not x.is_cuda:
        return x
    if not pin:
        return x.cpu()
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    return out


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 values as bytes (torch's index copies do not take fp8); others as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _tensors(kv: LayerKV) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """A layer's cache tensors with their scales (MLA: the latent only)."""
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = [(kv.k, kv.k_scale)]
    if kv.v is not None:
        out.append((kv.v, kv.v_scale))
    return out


def build_tier(layers: list[LayerKV], memory: int, mode: str, device: str) -> HostKVTier:
    """A tier of as many slots as `memory` bytes hold in `mode` (resolve_mode), logged."""
    per = HostKVTier.slot_bytes(layers, mode)
    n = memory // per
    if n < 1:
        raise ConfigError(f"--kv-offload-memory {memory} bytes holds no page ({per} bytes per page in {mode} form)")
    tier = HostKVTier(layers, n, mode, pin=device == "cuda")
    log.info("KV host tier: %d pages (%.2f GiB, %s form, %d bytes/page)", n, n * per / (1 << 30), mode, per)
    return tier
