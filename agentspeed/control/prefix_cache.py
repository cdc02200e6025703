"""Prefix-cache keys: a chain of hashes over full pages. Page i's key hashes page i-1's key,
the page's token ids and the request's extra keys (e.g. a cache salt), so equal keys mean
equal whole prefixes. Python's tuple/int hashing is deterministic within a process, which
is the index's lifetime."""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def chain_hash(parent: int | None, tokens: Sequence[int], extra: Hashable = None) -> int:
    return hash((parent, tuple(tokens), extra))


def extend_hashes(
    hashes: list[int], tokens: Sequence[int], page_size: int, extra: Hashable = None
) -> list[int]:
    """Append to `hashes` the keys of every further full page of `tokens` (hashes already
    covers the first len(hashes) pages). Returns `hashes`."""
    n_full = len(tokens) // page_size
    for i in range(len(hashes), n_full):
        parent = hashes[-1] if hashes else None
        hashes.append(chain_hash(parent, tokens[i * page_size : (i + 1) * page_size], extra))
    return hashes
