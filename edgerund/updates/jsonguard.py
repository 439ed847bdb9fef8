"""A linear pre-scan of unauthenticated JSON before it reaches `json.loads` (pure).

The manifest of a bundle (and its signature file, and a keyring handed in by an update
source) must be parsed before its signature can be checked: the signature covers the
canonical form of the parsed document. The stdlib parser is linear in time, but it
recurses per nesting level: 20,000 nested `[` raise RecursionError (not ValueError), which
would escape the trust layer as a crash instead of a refusal. This scan counts nesting
outside strings in one pass and refuses documents deeper than any legitimate manifest
(ours nest 4 levels) before the parser sees them. Size is capped by the callers.
"""

from __future__ import annotations

from edgerund.errors import TrustError

MAX_DEPTH = 32
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")


def check_depth(data: bytes, what: str, code: str, max_depth: int = MAX_DEPTH) -> None:
    """TrustError(code) when `data` nests arrays/objects deeper than `max_depth`."""
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return  # cannot be deeper: skip the byte loop
    depth = 0
    in_str = False
    esc = False
    for c in data:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:  # backslash
                esc = True
            elif c == 0x22:  # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in _OPEN:
            depth += 1
            if depth > max_depth:
                raise TrustError(code, f"{what}: nesting deeper than {max_depth} levels is refused")
        elif c in _CLOSE:
            depth -= 1
