"""The caching host allocator (kernels/native/host_alloc.cpp): torch's CPU tensors of 1 MiB
and more come from blocks that are mapped once and reused, instead of glibc's heap.

Why it is on by default for the CPU engine: a prefill step allocates the same activations in
every layer. glibc serves them from a thread arena whose fragmentation held +232 to +244 MiB at
the peak of a 2,690-token Qwen2.5-1.5B Q6_K prompt, against +129 MiB through this allocator
(docs/benchmarks.md, "Host memory"); forcing glibc to map and unmap each
(MALLOC_MMAP_THRESHOLD_) frees them but faults every page in again on every allocation.

Contract: `install()` builds the library (against this torch's c10 headers, cached like the
kernels) and makes it torch's CPU allocator for the rest of the process; it returns False and
says why in the log where it cannot be built (no compiler, no torch headers): the process then
keeps glibc, which is correct, only bigger. `empty_cache()` unmaps every cached block (after
loading, so load-time transients are not kept).
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from agentspeed.kernels.native import FLAGS, LINK_FLAGS, NativeBuildError, build, open_library

log = logging.getLogger(__name__)

# The most bytes of freed blocks kept for reuse; beyond it the largest are unmapped. A
# 2,048-token prefill step of a 1.5B model has ~105 MiB live, a 7B's ~250 MiB.
CACHE_LIMIT = 512 << 20
ABI = 1
_active = False


@dataclass(frozen=True, slots=True)
class HostAllocStats:
    mapped: int  # bytes of big blocks mapped now (in use + cached)
    peak_mapped: int
    cached: int  # bytes of freed blocks kept for reuse
    hits: int  # big requests served from the cache
    misses: int  # big requests that mapped a new block
    unmapped: int  # bytes given back to the system


@cache
def _library() -> ctypes.CDLL:
    root = Path(torch.__file__).parent
    src = Path(__file__).parents[1] / "kernels" / "native" / "host_alloc.cpp"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [*FLAGS, f"-I{root / 'include'}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    link = [*LINK_FLAGS, f"-L{root / 'lib'}", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]
    out = build("libagentspeed_host_alloc.so", [src], flags=flags, link_flags=link,
                key=f"torch {torch.__version__} {sysconfig.get_platform()}")
    lib = open_library(out, "agentspeed_host_alloc_abi", ABI)
    lib.agentspeed_host_alloc_install.argtypes = [ctypes.c_uint64, ctypes.c_int]
    lib.agentspeed_host_alloc_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
    return lib


def install(limit: int = CACHE_LIMIT, huge_pages: bool = True) -> bool:
    """Make the caching allocator torch's CPU allocator in this process (idempotent: a second
    call changes nothing). False, with the reason logged, where it cannot be built here."""
    try:
        lib = _library()
    except NativeBuildError as e:
        log.warning("caching host allocator unavailable, CPU tensors stay on glibc's heap: %s", e)
        return False
    global _active
    if lib.agentspeed_host_alloc_install(limit, int(huge_pages)):
        log.info("caching host allocator installed (blocks >= 1 MiB; up to %d MiB cached)", limit >> 20)
    _active = True
    return True


def active() -> bool:
    """Whether this process's CPU tensors come from the caching allocator (it cannot be
    uninstalled: tensors it made must go back to it)."""
    return _active


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor in a private anonymous mapping of its own: its pages become
    resident as they are first written, not at allocation (torch.zeros writes every page).
    For the KV pool: a server's cache costs memory as it fills, not up front."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # (the tensor keeps buf alive)


def empty_cache() -> None:
    """Unmap every cached (free) block."""
    if _library.cache_info().currsize:
        _library().agentspeed_host_alloc_empty_cache()


def stats() -> HostAllocStats:
    """Counters of the installed allocator (all zero before install)."""
    if not _library.cache_info().currsize:
        return HostAllocStats(0, 0, 0, 0, 0, 0)
    out = (ctypes.c_uint64 * 6)()
    _library().agentspeed_host_alloc_stats(out)
    return HostAllocStats(*(int(v) for v in out))
