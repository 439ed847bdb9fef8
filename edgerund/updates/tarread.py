"""A strict, linear-time reader of plain POSIX ustar archives (sans general-purpose parser).

Why not `tarfile`: a bundle is read BEFORE its signature is checked, so every byte of it is
attacker-controlled. `tarfile` understands pax ('x'/'g') and GNU ('L'/'K', sparse) extension
headers; parsing pax records is quadratic in CPython before 3.12.5 (CVE-2024-6232: a 40 KB
pax header held the GIL, and so the event loop and the control threads, for 5.6 s), and
every extension is a second way to spell a member's name or size. A bundle needs none of
it: the publisher (edgerund.publisher.build.write_tar) emits exactly what this reader
accepts and nothing else.

What is accepted, and nothing more:
  - 512-byte headers with the POSIX magic `ustar\\0` + version `00`;
  - a checksum that matches the unsigned byte sum of the header (checksum field as spaces);
  - numeric fields (mode, uid, gid, size, mtime, checksum, devmajor/minor) as octal ASCII
    digits, optionally space-padded in front, terminated by NUL or space (no base-256);
  - typeflag '0' (or the historical NUL): regular files only. Links ('1', '2'), devices and
    FIFOs ('3', '4', '6'), directories ('5'), contiguous files ('7'), pax headers ('x',
    'g'), GNU long names ('L', 'K'), sparse files ('S') and anything else are refused from
    the header, before a byte of their content is read;
  - names from `prefix/name`, printable ASCII, with NUL only as terminator (a NUL followed
    by more bytes is a smuggling attempt), relative, normalised, no `..`, no backslash,
    at most 255 bytes; no name twice;
  - a declared size no larger than `member_max_bytes` and than what is left of the file;
  - at most `max_members` members;
  - the end: a zero block, after which only zero bytes may follow (tar pads to a record);
    other trailing bytes are refused (`trailing_data`), and a file that ends without the
    zero block is `bundle_truncated`.

Cost: a constant amount of work per 512-byte header plus the payload bytes the caller
reads, so the whole pass is linear in the file size (itself capped by the caller).
Blocking I/O: the caller runs it in a worker thread.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import IO

from edgerund.errors import TrustError

BLOCK = 512
MAX_NAME_BYTES = 255
MAGIC = b"ustar\x0000"  # magic "ustar\0" followed by version "00" (POSIX.1-1988 ustar)
_REGULAR = (b"0", b"\x00")
_LINKS = {b"1": "hard link", b"2": "symlink"}
_EXTENSIONS = {
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long name",
    b"K": "GNU long link name",
}
_SPECIAL = {
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"S": "GNU sparse file",
}
_SKIP_CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    name: str
    size: int


def _octal(field: bytes, what: str) -> int:
    """Strict octal: optional leading spaces, octal digits, then only NUL/space."""
    s = field.lstrip(b" ")
    end = len(s)
    for i, c in enumerate(s):
        if c in (0, 0x20):
            end = i
            break
    digits, rest = s[:end], s[end:]
    if rest.strip(b"\x00 "):
        raise TrustError("bundle_malformed", f"tar header {what}: bytes after the terminator")
    if not digits:
        return 0
    if not all(0x30 <= c <= 0x37 for c in digits):
        raise TrustError(
            "bundle_malformed", f"tar header {what}: expected octal digits, got {field!r}"
        )
    return int(digits, 8)


def _cstring(field: bytes, what: str) -> bytes:
    """The bytes before the first NUL; every byte after it must be NUL too."""
    i = field.find(b"\x00")
    if i < 0:
        return field
    if field[i:].strip(b"\x00"):
        raise TrustError("unsafe_path", f"tar header {what}: data hidden after a NUL byte")
    return field[:i]


def safe_name(raw: bytes) -> str:
    """The member name, or TrustError("unsafe_path")."""
    if len(raw) > MAX_NAME_BYTES or not all(0x20 < c < 0x7F for c in raw):
        raise TrustError(
            "unsafe_path", f"tar member name {raw[:64]!r}: expected printable ASCII, no spaces"
        )
    name = raw.decode("ascii")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or ".." in name.split("/")
        or name.startswith("./")
        or posixpath.normpath(name) != name
    ):
        raise TrustError("unsafe_path", f"tar member name {name!r} is not a safe relative path")
    return name


def parse_header(block: bytes) -> Member | None:
    """One 512-byte header -> Member, or None for the end-of-archive zero block."""
    if len(block) != BLOCK:
        raise TrustError("bundle_truncated", f"tar header: expected 512 bytes, got {len(block)}")
    if block == bytes(BLOCK):
        return None
    stored = _octal(block[148:156], "checksum")
    actual = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != actual:
        raise TrustError(
            "bundle_malformed", f"tar header checksum: expected {actual:o}, header says {stored:o}"
        )
    flag = block[156:157]
    # For messages only: the strict name rules apply to regular files, below.
    shown = block[0:100].split(b"\x00", 1)[0].decode("ascii", "replace")
    if flag in _EXTENSIONS:
        raise TrustError(
            "tar_extension",
            f"tar member {shown!r} is a {_EXTENSIONS[flag]}: only plain ustar headers are read",
        )
    if flag in _LINKS:
        link = block[157:257].split(b"\x00", 1)[0].decode("ascii", "replace")
        raise TrustError("link_member", f"tar member {shown!r} is a {_LINKS[flag]} (to {link!r})")
    if flag not in _REGULAR:
        kind = _SPECIAL.get(flag, f"member of unknown type {flag!r}")
        raise TrustError(
            "special_member", f"tar member {shown!r} is a {kind}, expected a regular file"
        )
    if block[257:265] != MAGIC:
        raise TrustError(
            "bundle_malformed",
            f"tar header magic: expected POSIX ustar {MAGIC!r}, got {block[257:265]!r}"
            " (build with `edgerund bundle build` or `tar --format=ustar`)",
        )
    if block[157:257].strip(b"\x00"):
        raise TrustError("bundle_malformed", f"tar member {shown!r}: a regular file has a linkname")
    raw_name = _cstring(block[0:100], "name")
    prefix = _cstring(block[345:500], "prefix")
    for lo, hi, what in ((100, 108, "mode"), (108, 116, "uid"), (116, 124, "gid")):
        _octal(block[lo:hi], what)
    _octal(block[136:148], "mtime")
    size = _octal(block[124:136], "size")
    name = safe_name(prefix + b"/" + raw_name if prefix else raw_name)
    return Member(name, size)


class UstarReader:
    """Sequential reader: `next()` gives the next member (skipping what the caller did not
    read of the previous one), `read(n)` reads from the current member, never past its
    declared size. `f` must deliver at most `file_size` bytes."""

    def __init__(
        self, f: IO[bytes], file_size: int, *, member_max_bytes: int, max_members: int = 256
    ) -> None:
        self._f = f
        self._left_in_file = file_size
        self._member_max = member_max_bytes
        self._max_members = max_members
        self._left = 0  # unread bytes of the current member
        self._pad = 0  # padding after the current member
        self._count = 0
        self._names: set[str] = set()
        self._ended = False

    def _raw(self, n: int) -> bytes:
        data = self._f.read(n)
        self._left_in_file -= len(data)
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            got = self._raw(min(n, _SKIP_CHUNK))
            if not got:
                raise TrustError("bundle_truncated", "tar data ends inside a member")
            n -= len(got)

    def next(self) -> Member | None:
        if self._ended:
            return None
        self._skip(self._left + self._pad)
        self._left = self._pad = 0
        block = self._raw(BLOCK)
        if not block:
            raise TrustError("bundle_truncated", "tar ends without its end-of-archive block")
        m = parse_header(block)
        if m is None:
            self._ended = True
            self._check_trailer()
            return None
        self._count += 1
        if self._count > self._max_members:
            raise TrustError(
                "too_many_members", f"tar: expected at most {self._max_members} members"
            )
        if m.name in self._names:
            raise TrustError("duplicate_member", f"tar member {m.name!r} appears more than once")
        self._names.add(m.name)
        if m.size > self._member_max:
            raise TrustError(
                "file_too_large",
                f"{m.name}: expected at most {self._member_max} bytes, tar header says {m.size}",
            )
        pad = -m.size % BLOCK
        if m.size + pad > self._left_in_file:
            raise TrustError(
                "bundle_truncated",
                f"{m.name}: tar header says {m.size} bytes, only {self._left_in_file} left in the file",
            )
        self._left, self._pad = m.size, pad
        return m

    def read(self, n: int) -> bytes:
        n = min(n, self._left)
        if n <= 0:
            return b""
        data = self._raw(n)
        if len(data) != n:
            raise TrustError("bundle_truncated", "tar data ends inside a member")
        self._left -= n
        return data

    def _check_trailer(self) -> None:
        while self._left_in_file > 0:
            chunk = self._raw(min(self._left_in_file, _SKIP_CHUNK))
            if not chunk:
                return
            if chunk.strip(b"\x00"):
                raise TrustError(
                    "trailing_data", "tar: non-zero bytes after the end-of-archive block"
                )
