"""How deep a JSON text nests, found in one linear pass before `json.loads` sees it (pure).

The stdlib parser recurses once per nesting level, so 20,000 nested `[` raise
RecursionError rather than a ValueError, escaping whatever error type the caller promises
(a refused bundle, a `bad_request`, a DecodeError). Every place that parses JSON from an
untrusted peer (the diagnostics socket, bundle manifests and keyrings, telemetry event
fields and `meta`) asks this first. Brackets inside strings do not count.
"""

from __future__ import annotations

_QUOTE, _BACKSLASH = 0x22, 0x5C
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")


def too_deep(data: bytes | str, limit: int) -> bool:
    """True when `data` nests arrays/objects deeper than `limit`."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # cannot be deeper: skip the byte loop
    depth = 0
    in_str = False
    esc = False
    for c in raw:
        if in_str:
            if esc:
                esc = False
            elif c == _BACKSLASH:
                esc = True
            elif c == _QUOTE:
                in_str = False
        elif c == _QUOTE:
            in_str = True
        elif c in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif c in _CLOSE:
            depth -= 1
    return False
