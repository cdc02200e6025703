"""Incremental detokenization with stop strings, for one sample of one request.

Contract: the deltas returned by `update` concatenate to `text`, the final text (cut before
a stop string, or after it with include_stop_str_in_output). Text that could still turn out
to begin a stop string is held back until it cannot, so a streamed response never shows
characters the final text does not have.

Decoding only re-decodes a short window of tokens per update (not the whole output), and
never emits a partial UTF-8 character (a token may end mid-character: decode shows U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Tokens of context kept before the first generated token: SentencePiece-style tokenizers
# drop a leading space when a window starts at a word boundary token.
_CONTEXT = 5


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    __slots__ = (
        "_checked",
        "_hold",
        "_ids",
        "_include_stop",
        "_prefix",
        "_read",
        "_skip",
        "_stops",
        "_tok",
        "emitted",
        "stop_reason",
        "text",
    )

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self._skip = skip_special_tokens
        self._stops = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._checked = 0
        self.text = ""
        self.emitted = 0
        self.stop_reason: str | None = None  # the stop string that ended the text, if any

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def update(self, new_ids: Sequence[int], finished: bool) -> str:
        """Add generated tokens; return the text that can be shown now. After a stop string
        is found (`stopped`), further calls return ""."""
        if self.stop_reason is not None:
            return ""
        if new_ids:
            self._ids.extend(new_ids)
            dec = self._tok.decode
            before = dec(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
            after = dec(self._ids[self._prefix :], skip_special_tokens=self._skip)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before) :]
                self._prefix, self._read = self._read, len(self._ids)
            elif finished and after.startswith(before):
                self.text += after[len(before) :]  # a dangling partial character at the end
        if self._stops and self._find_stop():
            finished = True
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self._hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def _find_stop(self) -> bool:
        start = max(0, self._checked - self._hold)
        self._checked = len(self.text)
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if self._include_stop else self.text[:i]
        self.stop_reason = s
        return True
