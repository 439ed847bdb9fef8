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
from edgerund.jsondepth import too_deep

MAX_DEPTH = 32


def check_depth(data: bytes, what: str, code: str, max_depth: int = MAX_DEPTH) -> None:
    """TrustError(code) when `data` nests arrays/objects deeper than `max_depth`."""
    if too_deep(data, max_depth):
        raise TrustError(code, f"{what}: nesting deeper than {max_depth} levels is refused")
