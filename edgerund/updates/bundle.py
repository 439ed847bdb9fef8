"""Reading a bundle: one sequential pass over the tar, checks before every byte (blocking I/O;
the component runs it in a worker thread).

Bundle layout (see docs/updates.md): an uncompressed POSIX ustar archive (no pax or GNU
extension headers) whose FIRST member is `manifest.json` and SECOND is `manifest.sig`,
followed by the payload files listed in the manifest. Fixing the order lets the device
authenticate the manifest before it extracts a single payload byte, and read the tar as a
stream (no seeking, no second open: what is hashed is exactly what is written to staging,
so there is no time-of-check/time-of-use gap).

No general-purpose parser sees the unauthenticated bytes: the tar headers are read by
tarread.UstarReader (fixed 512-byte ustar headers, linear time, regular files only; never
`tarfile`), and manifest.json / manifest.sig are depth-checked (jsonguard) and size-capped
before the strict JSON parser runs on them.

Checks, in order:
  - the path is a regular file (a FIFO or device, e.g. an endless /dev/zero, is refused)
    and its size is within bundle_max_mb, before anything is read;
  - every tar header is plain ustar with a valid checksum, a regular file with a safe
    relative name (no absolute path, no `..`, no backslash or NUL, normalised), listed
    once; links, devices, FIFOs, directories and extension headers are refused from the
    header, before their content is read (tarread.py);
  - manifest.json and manifest.sig are size-capped and read into memory; the trust
    decision (trust.verify_manifest) runs on them;
  - each payload member must be listed in the signed manifest with the same size, is at
    most file_max_mb, and is copied into the staging directory while being hashed,
    reading never more than its declared size;
  - trust.verify_files then compares every size and hash (missing, extra, mix-and-match);
  - after the end-of-archive block only zero padding may follow.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edgerund.errors import TrustError
from edgerund.updates import fsutil
from edgerund.updates.jsonguard import check_depth
from edgerund.updates.keyring import Keyring
from edgerund.updates.manifest import BundleManifest, strict_json
from edgerund.updates.tarread import Member, UstarReader
from edgerund.updates.trust import (
    Device,
    FileDigest,
    Installed,
    Limits,
    Verdict,
    check_size,
    verify_files,
    verify_manifest,
)

SIG_MAX_BYTES = 64 * 1024
CHUNK = 1 << 20
MAX_MEMBERS = 256  # manifest.json, manifest.sig and the payload files

Progress = Callable[[int, int], None]


class _CappedReader(io.RawIOBase):
    """Reads at most `limit` bytes from `f` (the size stat'ed before reading): a file that
    grows while we read it cannot push more than the checked size through."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f = f
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        view = memoryview(b)[: self._left]
        n = self._f.readinto(view)  # type: ignore[attr-defined]
        n = n or 0
        self._left -= n
        return int(n)


def _reader(f: IO[bytes], size: int, member_max: int) -> UstarReader:
    capped = io.BufferedReader(_CappedReader(f, size), buffer_size=CHUNK)
    return UstarReader(capped, size, member_max_bytes=member_max, max_members=MAX_MEMBERS)


def _read_small(tr: UstarReader, m: Member, cap: int, what: str) -> bytes:
    if m.size > cap:
        raise TrustError("file_too_large", f"{what}: expected at most {cap} bytes, got {m.size}")
    data = tr.read(m.size)
    if len(data) != m.size:
        raise TrustError("bundle_truncated", f"{what}: expected {m.size} bytes, got {len(data)}")
    return data


def open_bundle(path: Path) -> tuple[IO[bytes], int]:
    """Open a bundle path: regular files only (a FIFO or device could be endless)."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer appears.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise TrustError("not_found", f"bundle {str(path)!r} does not exist") from None
    except PermissionError:
        raise TrustError(
            "not_readable", f"bundle {str(path)!r} is not readable by the daemon"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise TrustError("not_a_file", f"{str(path)!r} is not a regular file")
    os.set_blocking(fd, True)
    f = os.fdopen(fd, "rb")
    return f, st.st_size


@dataclass(frozen=True)
class BundleHead:
    """The first two members, read into memory: nothing in them is trusted yet (both are
    size-capped and depth-checked, nothing more)."""

    manifest_bytes: bytes
    sig_bytes: bytes | None  # None: the second member is not manifest.sig (unsigned)


class BundleReader:
    """One bundle file, opened once and read front to back (blocking: run each call off
    the event loop). `sniff` looks at the first bytes without consuming them (a keyring
    document or a tar?), `head` reads manifest.json and manifest.sig, `extract` copies the
    payload into staging while hashing it. The same open file serves all three, so what
    was authenticated and what is extracted come from one read of one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f, self.size = open_bundle(path)
        self._tr: UstarReader | None = None
        self._pending: Member | None = None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sniff(self, n: int = 64) -> bytes:
        """The first `n` bytes, without moving the read position."""
        return os.pread(self._f.fileno(), n, 0)

    def read_all(self, cap: int) -> bytes:
        """The whole (small) file: a keyring document."""
        data = self._f.read(cap + 1)
        if len(data) > cap:
            raise TrustError("too_large", f"{self.path}: expected at most {cap} bytes")
        return data

    def head(self, manifest_max: int) -> BundleHead:
        """manifest.json (first member) and manifest.sig (second, when present)."""
        # Members are capped by the file size here; the per-file cap (file_max_mb) is
        # applied in extract against the signed manifest, the head caps in _read_small.
        tr = _reader(self._f, self.size, self.size)
        self._tr = tr
        first = tr.next()
        if first is None:
            raise TrustError("bundle_malformed", "empty tar")
        if first.name != "manifest.json":
            raise TrustError(
                "bundle_layout",
                f"the first tar member must be manifest.json, got {first.name!r}",
            )
        manifest_bytes = _read_small(tr, first, manifest_max, "manifest.json")
        check_depth(manifest_bytes, "manifest.json", "manifest_malformed")
        second = tr.next()
        sig_bytes: bytes | None = None
        self._pending = second
        if second is not None and second.name == "manifest.sig":
            sig_bytes = _read_small(tr, second, SIG_MAX_BYTES, "manifest.sig")
            check_depth(sig_bytes, "manifest.sig", "signature_malformed")
            self._pending = None
        return BundleHead(manifest_bytes, sig_bytes)

    def extract(
        self,
        staging: Path,
        manifest: BundleManifest,
        limits: Limits,
        progress: Progress | None = None,
    ) -> None:
        """The payload members (after `head` and the trust decision on it) into the empty
        `staging` directory, each hashed while copied; then every size and hash checked.
        On TrustError staging may hold partial files: the caller wipes it."""
        assert self._tr is not None, "head() first"
        pending, self._pending = self._pending, None
        _extract(self._tr, pending, staging, manifest, limits, progress)


def peek_model_name(path: Path, manifest_max: int) -> str:
    """The (unauthenticated) model name, to pick the model's state record. Nothing else
    in the manifest is used before the signature check."""
    with BundleReader(path) as reader:
        data = reader.head(manifest_max).manifest_bytes
    raw = strict_json(data, "manifest.json", "manifest_malformed")
    name = raw.get("model_name") if isinstance(raw, dict) else None
    if not isinstance(name, str):
        raise TrustError("manifest_malformed", "manifest.json has no model_name")
    return name


def read_bundle(
    path: Path,
    staging: Path,
    keyring: Keyring,
    *,
    now: float,
    device: Device,
    installed: Installed,
    limits: Limits,
    manifest_max: int,
    progress: Progress | None = None,
) -> tuple[Verdict, bytes, bytes]:
    """Verify `path` and extract its payload into the (empty) `staging` directory, in one
    pass (for `edgerund bundle verify` and tests; the daemon drives the BundleReader step
    by step). Returns the verdict and the raw manifest.json / manifest.sig bytes. On any
    TrustError the staging directory may hold partial files; the caller wipes it."""
    with BundleReader(path) as reader:
        check_size(reader.size, limits)
        head = reader.head(manifest_max)
        verdict = verify_manifest(
            head.manifest_bytes,
            head.sig_bytes,
            keyring,
            now=now,
            device=device,
            installed=installed,
            limits=limits,
        )
        assert head.sig_bytes is not None  # verify_manifest refuses unsigned bundles
        reader.extract(staging, verdict.manifest, limits, progress)
    return verdict, head.manifest_bytes, head.sig_bytes


def _extract(
    tr: UstarReader,
    pending: Member | None,
    staging: Path,
    manifest: BundleManifest,
    limits: Limits,
    progress: Progress | None,
) -> None:
    expected = {e.path: e for e in manifest.files}
    digests: dict[str, FileDigest] = {}
    total = sum(e.size for e in manifest.files)
    done = 0
    while True:
        m = pending if pending is not None else tr.next()
        pending = None
        if m is None:
            break
        name = m.name
        if name in ("manifest.json", "manifest.sig"):
            raise TrustError("duplicate_member", f"tar member {name!r} appears more than once")
        entry = expected.get(name)
        if entry is None:
            raise TrustError(
                "file_unexpected", f"tar member {name!r} is not listed in the signed manifest"
            )
        if m.size > limits.file_max_bytes:
            raise TrustError(
                "file_too_large",
                f"{name}: expected at most {limits.file_max_bytes} bytes, got {m.size}",
            )
        if m.size != entry.size:
            raise TrustError(
                "file_size", f"{name}: expected {entry.size} bytes, tar header says {m.size}"
            )
        dest = staging / name
        fsutil.make_dirs(dest.parent)  # intermediate directories durable too
        h = hashlib.sha256()
        n = 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            while n < entry.size:
                chunk = tr.read(min(CHUNK, entry.size - n))
                if not chunk:
                    break
                h.update(chunk)
                fsutil.write_all(fd, chunk)
                n += len(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            os.fsync(fd)
        finally:
            os.close(fd)
        if n != entry.size:
            raise TrustError("bundle_truncated", f"{name}: expected {entry.size} bytes, got {n}")
        digests[name] = FileDigest(h.hexdigest(), n)
    verify_files(manifest, digests)
    # Directory entries of the extracted files must be durable before the slot marker.
    for d in {staging, *((staging / p).parent for p in digests)}:
        fsutil.fsync_dir(d)


def hash_file(path: Path) -> FileDigest:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return FileDigest(h.hexdigest(), n)
