"""Reading JSON that is still being generated.

Tool-call arguments stream as the model writes them, so the parsers need to know, for a
prefix of a JSON text, which values are complete and where the unfinished one starts. The
contract that makes streamed arguments safe: the text returned for an unfinished value is a
prefix of the text returned once it is finished (both are the model's own bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

_DEC = json.JSONDecoder()
_WS = " \t\r\n"


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


@dataclass(slots=True)
class Value:
    """A JSON value at s[start:]: complete (end set) or still being written."""

    start: int
    end: int | None  # index just past the value, None while unfinished

    def text(self, s: str) -> str:
        return s[self.start : self.end] if self.end is not None else s[self.start :]


def read_value(s: str, i: int, final: bool) -> Value | None:
    """The value starting at s[i] (after whitespace). None: malformed, or (final) unfinished.

    A number or literal that reaches the end of the buffer counts as unfinished unless final
    (`12` may become `123`)."""
    i = skip_ws(s, i)
    if i >= len(s):
        return None if final else Value(i, None)
    try:
        _, end = _DEC.raw_decode(s, i)
    except json.JSONDecodeError:
        if final or not _may_continue(s, i):
            return None
        return Value(i, None)
    if end == len(s) and s[i] not in '{["' and not final:
        return Value(i, None)
    return Value(i, end)


def _may_continue(s: str, i: int) -> bool:
    """Could s[i:] still become valid JSON? Cheap check on the first character only; a
    wrong guess only delays the verdict to the end of the output."""
    return s[i] in '{["-0123456789tfn'


@dataclass(slots=True)
class ObjectScan:
    """The top-level members of a JSON object read so far."""

    members: dict[str, Value] = field(default_factory=dict)
    end: int | None = None  # index just past the closing brace
    ok: bool = True  # False: not an object, or a syntax error

    def string(self, s: str, key: str) -> str | None:
        """A complete string member's value, else None."""
        v = self.members.get(key)
        if v is None or v.end is None:
            return None
        try:
            out = json.loads(s[v.start : v.end])
        except json.JSONDecodeError:
            return None
        return out if isinstance(out, str) else None


def scan_object(s: str, i: int, final: bool) -> ObjectScan:
    """Members of the object opening at s[i] (after whitespace). Stops at the first
    unfinished member, which is recorded with end=None."""
    out = ObjectScan()
    i = skip_ws(s, i)
    if i >= len(s):
        out.ok = not final
        return out
    if s[i] != "{":
        out.ok = False
        return out
    i += 1
    while True:
        i = skip_ws(s, i)
        if i >= len(s):
            out.ok = not final
            return out
        if s[i] == "}":
            out.end = i + 1
            return out
        if s[i] == "," and out.members:
            i = skip_ws(s, i + 1)
            if i >= len(s):
                out.ok = not final
                return out
        if s[i] != '"':
            out.ok = False
            return out
        try:
            key, i = _DEC.raw_decode(s, i)
        except json.JSONDecodeError:
            out.ok = not final
            return out
        i = skip_ws(s, i)
        if i >= len(s):
            out.ok = not final
            return out
        if s[i] != ":":
            out.ok = False
            return out
        v = read_value(s, i + 1, final)
        if v is None:
            out.ok = False
            return out
        out.members[key] = v
        if v.end is None:
            return out
        i = v.end
