"""Crash-safe file primitives (blocking; callers run them off the event loop).

- `atomic_write`: temp file in the same directory, write, fsync(fd), rename over the
  target, fsync(dir). After a power cut the target holds either the old or the new bytes.
- `flip_symlink`: create `current.tmp` -> target, rename over `current`, fsync(dir).
  rename(2) replaces a symlink atomically; delete-then-create would leave a window with
  no `current` at all (the Greengrass bug noted in the research).
- `make_dirs`: mkdir -p that makes every directory it creates durable (fsync of its
  parent): a file fsynced into a directory whose own entry was never fsynced is lost
  with that directory at a power cut (found by the crash-consistency check,
  edgerund/toolkit/crashsim: a committed update vanished with `models/`).
- `write_all`: the single place bytes reach the OS while staging, so ENOSPC/EIO surface
  here (and tests can inject them at exactly this boundary).
- `abort_point`: the test-only fault injection hook: with EDGERUND_TEST_ABORT_AT=<phase>
  set, the process kills itself with SIGKILL when it reaches that phase, like a power cut.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

ABORT_ENV = "EDGERUND_TEST_ABORT_AT"


def abort_point(phase: str) -> None:
    """SIGKILL ourselves at `phase` when the test hook asks for it (never in production:
    the variable is unset)."""
    want = os.environ.get(ABORT_ENV)
    if want and want == phase:
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)  # unreachable unless SIGKILL is somehow blocked


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`path.mkdir(parents=True, exist_ok=True)`, durable: the parent of each directory
    created here is fsynced after it."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def flip_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` (a relative name) atomically; no-op when it already does."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == target:
            return
    tmp = link.with_name(f".{link.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def read_link(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except OSError:
        return None


def remove_tree(path: Path) -> None:
    """Remove a directory tree: rename aside first so a crash mid-delete never leaves a
    half-deleted tree under the original name."""
    if not path.exists() and not path.is_symlink():
        return
    trash = path.with_name(f".{path.name}.trash")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
