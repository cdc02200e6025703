"""Reasoning parsers (--reasoning-parser): split <think>...</think> from the answer.

    deepseek_r1  the output starts inside the reasoning (the R1 templates open <think> in
                 the prompt, or the model writes it first) until </think>
    qwen3        reasoning only where the prompt ends with <think> or the model opens one
                 itself; with thinking disabled (an empty think block in the prompt) all
                 output is the answer

Either way a prompt that already closed the block (ends with </think>) means no reasoning,
an explicit leading <think> is honoured and dropped, and whitespace after </think> is not
part of the answer. Partial tags at the end of a delta are held back, so a tag split across
tokens is never shown.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def _partial_suffix(s: str, tag: str) -> int:
    """Length of the longest suffix of s that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(s)), 0, -1):
        if tag.startswith(s[-k:]):
            return k
    return 0


class ReasoningSplitter:
    """One sample's text -> (is_reasoning, text) pieces. Phases: "open" (a leading <think>
    may still come), "think", "gap" (whitespace after </think>), "answer"."""

    def __init__(self, parser: str, prompt_text: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r} (choose from {', '.join(REASONING_PARSERS)})")
        tail = prompt_text.rstrip()
        if tail.endswith(END):
            self.default_think = False
        elif tail.endswith(START):
            self.default_think = True
        else:
            self.default_think = parser == "deepseek_r1"
        self.phase = "open"
        self.held = ""

    def feed(self, text: str) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        s = self.held + text
        self.held = ""
        while s:
            if self.phase == "open":
                body = s.lstrip()
                if body.startswith(START):
                    self.phase, s = "think", body[len(START) :]
                elif START.startswith(body):
                    self.held = s  # still could be "<think>"
                    return out
                else:
                    self.phase = "think" if self.default_think else "answer"
            elif self.phase == "think":
                i = s.find(END)
                if i >= 0:
                    if i:
                        out.append((True, s[:i]))
                    self.phase, s = "gap", s[i + len(END) :]
                    continue
                k = _partial_suffix(s, END)
                if len(s) > k:
                    out.append((True, s[: len(s) - k]))
                self.held = s[len(s) - k :]
                return out
            elif self.phase == "gap":
                s = s.lstrip()
                if s:
                    self.phase = "answer"
            else:
                out.append((False, s))
                return out
        return out

    def finish(self) -> list[tuple[bool, str]]:
        held, self.held = self.held, ""
        if not held:
            return []
        if self.phase == "open":  # the output was only a prefix of "<think>" (or whitespace)
            return [(self.default_think, held)]
        return [(self.phase == "think", held)]

    @property
    def in_reasoning(self) -> bool:
        return self.phase == "think" or (self.phase == "open" and self.default_think)
