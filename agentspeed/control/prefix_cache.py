"""Prefix-cache keys: a chain of SHA-256 digests over full pages. Page i's key digests page
i-1's key, the request's extra key (its cache salt) and the page's token ids, so equal keys
mean equal whole prefixes under the same salt.

Why SHA-256 and not Python's hash(): the index is shared by every client of the server, and
a key collision lets one client read (or poison) another's KV. hash() of a tuple of ints is
not collision-resistant (an int hashes to itself modulo 2**61 - 1, so two different pages
can be made to share a key); vLLM fixed the same flaw as a security advisory by moving to
SHA-256. The encoding is canonical and unambiguous: a fixed-width parent key (32 zero bytes
for the first page), the salt as length-prefixed UTF-8, then each token as a signed 64-bit
little-endian integer. Measured cost: benchmarks/engine/bench_prefix_hash.py (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

PageKey = bytes  # a 32-byte SHA-256 digest

_ROOT = bytes(32)
_LEN = struct.Struct("<I")
_TOKEN_FORMATS: dict[int, struct.Struct] = {}


def _salt_bytes(salt: str | None) -> bytes:
    if salt is None:
        return b"\x00"  # distinct from the empty salt, whose prefix is 01 00000000
    raw = salt.encode()
    return b"\x01" + _LEN.pack(len(raw)) + raw


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    fmt = _TOKEN_FORMATS.get(len(tokens))
    if fmt is None:
        fmt = _TOKEN_FORMATS[len(tokens)] = struct.Struct(f"<{len(tokens)}q")
    return fmt.pack(*tokens)


def chain_hash(parent: PageKey | None, tokens: Sequence[int], salt: str | None = None) -> PageKey:
    """The key of a page holding `tokens` after the prefix whose last page key is `parent`."""
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    h.update(_salt_bytes(salt))
    h.update(_tokens_bytes(tokens))
    return h.digest()


def extend_hashes(
    hashes: list[PageKey], tokens: Sequence[int], page_size: int, salt: str | None = None
) -> list[PageKey]:
    """Append to `hashes` the keys of every further full page of `tokens` (hashes already
    covers the first len(hashes) pages). Returns `hashes`."""
    n_full = len(tokens) // page_size
    if n_full <= len(hashes):
        return hashes
    extra = _salt_bytes(salt)
    fmt = _TOKEN_FORMATS.get(page_size)
    if fmt is None:
        fmt = _TOKEN_FORMATS[page_size] = struct.Struct(f"<{page_size}q")
    parent = hashes[-1] if hashes else _ROOT
    for i in range(len(hashes), n_full):
        h = hashlib.sha256(parent)
        h.update(extra)
        h.update(fmt.pack(*tokens[i * page_size : (i + 1) * page_size]))
        parent = h.digest()
        hashes.append(parent)
    return hashes
