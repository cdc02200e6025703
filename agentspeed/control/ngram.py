"""N-gram (prompt-lookup) drafting for speculative decoding: the next tokens are guessed as
the ones that followed the latest earlier occurrence of the sequence's last n tokens.

Agent traffic repeats itself: answers quote the code, paths and identifiers of the prompt
they answer, and a verification step that accepts some of the guesses yields several tokens
for one read of the weights and the KV cache. Pure Python, no torch: the scheduler drafts
while it plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class NgramDrafter:
    """Drafts for one growing token list (the request's prompt + outputs, shared, not copied).

    draft(k) returns up to k tokens (possibly none): the continuation of the latest earlier
    occurrence of the longest suffix of n tokens, max_n >= n >= min_n, that occurred before.
    A caller may rely on the draft being a slice of the list's own tokens, and on the index
    never matching the suffix with itself.
    """

    tokens: list[int]
    max_n: int = 3
    min_n: int = 1
    # n-gram -> the position right after its latest occurrence that has a continuation
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # n-grams ending before this position are in `index`

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {self.min_n}, {self.max_n}")

    def _catch_up(self) -> None:
        t, end = self.tokens, len(self.tokens) - 1  # n-grams ending at `end` have no continuation yet
        if end < self.indexed:
            return
        lo = self.indexed
        index = self.index
        for n in range(self.min_n, self.max_n + 1):
            first = max(lo, n)  # the first end position that has n tokens before it
            if first >= end + 1:
                continue
            # Later occurrences overwrite earlier ones: the dict keeps the latest. A
            # comprehension over zipped slices runs ~1 us per n-gram (a whole 8K prompt in ms).
            cols = [t[first - n + i : end - n + i + 1] for i in range(n)]
            index.update({g: e for e, g in zip(range(first, end + 1), zip(*cols))})
        self.indexed = end + 1

    def draft(self, k: int) -> list[int]:
        if k <= 0:
            return []
        self._catch_up()
        t = self.tokens
        for n in range(min(self.max_n, len(t) - 1), self.min_n - 1, -1):
            e = self.index.get(tuple(t[-n:]))
            if e is not None:
                return t[e : e + k]
        return []
