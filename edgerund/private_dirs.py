"""Directories the daemon must own: created private, refused if someone else owns them.

The simulator's defaults live under /tmp (`/tmp/edgerund-sim`), where any local user can
create a path first. If another user owned the run directory, they could replace the
diagnostics socket and answer as the daemon; if they owned the state directory, they
could plant models and keys. So a directory is created with `mode` (0700: only us), and
one that already exists must be a real directory (lstat: a symlink is refused, never
followed), owned by us or root, and not writable by group or others (it is never
chmod-ed: it could be /tmp itself). Errors are ConfigErrors naming the config key, so
start-up stops with exit 2 and a message saying what to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgerund.errors import ConfigError

__all__ = ["ensure_private_dir"]


def ensure_private_dir(path: Path, key: str, mode: int = 0o700) -> None:
    """Create `path` with `mode`, or check that the existing one is ours alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}", path=key) from None
    st = os.lstat(path)
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory (a symlink or a file); remove it", path=key)
    if st.st_uid not in (me, 0):
        raise ConfigError(
            f"{path} is owned by uid {st.st_uid}, not by this user (uid {me}) or root; "
            "someone else created it first: remove it or choose another path",
            path=key,
        )
    if st.st_mode & 0o022:
        # Never chmod an existing directory: it may be /tmp itself.
        raise ConfigError(
            f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            "choose a directory only this user can write",
            path=key,
        )
