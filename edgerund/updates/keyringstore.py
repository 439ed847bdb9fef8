"""Where the device keeps its keyring history and its keyring version floor (blocking I/O;
the component calls it off the loop). The decisions are in keyring.verify_chain.

On disk, under `<state_dir>/updates/`:

    keyrings/v<N>.json   every rotation document the device accepted, byte for byte as
                         received (signatures included), one per version: the chain that
                         start-up re-verifies from the provisioned root
    keyring.json         the last accepted document (kept for older tools and for
                         compatibility with state written before the chain existed; it is
                         just one more candidate link, never trusted by itself)
    keyring-floor        {"version": N}: the highest keyring version ever verified here

Order on rotation: the document is durable in keyrings/ BEFORE the floor is raised, so a
crash never leaves a floor that no stored chain can reach. The floor only goes up.

Threat model of the floor: deleting `keyrings/` or `keyring.json` (an attacker, a botched
clean-up) cannot bring back revoked keys, because the floor makes the verdict unusable
(`keyring_below_floor`) instead of falling back to the root. Like the file security
counter, a floor in the state directory is best effort against someone who can also
delete or rewrite the floor file itself (root, or the daemon's own user); a TPM NV index
is the strong pin (docs/updates.md). An unreadable floor is treated as unknown-but-high:
the device refuses updates with `keyring_floor_unreadable` until an administrator removes
the file on purpose.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from edgerund.errors import TrustError
from edgerund.updates import fsutil
from edgerund.updates.keyring import ChainVerdict, Keyring, verify_chain

DOC_MAX_BYTES = 1 << 20
MAX_DOCS = 512
_DOC_RE = re.compile(r"^v[0-9]{1,9}\.json$")
FLOOR_UNREADABLE = 2**62  # an unreadable floor is higher than any real version


class KeyringStore:
    def __init__(self, upd_dir: Path) -> None:
        self.upd_dir = upd_dir
        self.chain_dir = upd_dir / "keyrings"
        self.legacy = upd_dir / "keyring.json"
        self.floor_path = upd_dir / "keyring-floor"

    # -- reading ---------------------------------------------------------------------------
    def documents(self) -> list[bytes]:
        """Every stored candidate document (capped in size and number; never followed
        through symlinks)."""
        paths: list[Path] = []
        try:
            names = sorted(os.listdir(self.chain_dir))
        except FileNotFoundError:
            names = []
        paths = [self.chain_dir / n for n in names if _DOC_RE.match(n)][:MAX_DOCS]
        paths.append(self.legacy)
        out = []
        for p in paths:
            data = _read_capped(p)
            if data is not None:
                out.append(data)
        return out

    def read_floor(self) -> int:
        try:
            data = _read_capped(self.floor_path, strict=True)
        except TrustError:
            return FLOOR_UNREADABLE
        if data is None:
            return 0
        try:
            v = json.loads(data)["version"]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(v)
        except (ValueError, KeyError, TypeError):
            return FLOOR_UNREADABLE
        return v

    def load(self, root: Keyring) -> ChainVerdict:
        """Verify the stored chain from `root` against the floor, and raise the floor to
        the verified version (so the next start needs at least as much)."""
        floor = self.read_floor()
        verdict = verify_chain(root, self.documents(), floor=floor)
        if floor == FLOOR_UNREADABLE:
            return ChainVerdict(
                keyring=verdict.keyring,
                chain=verdict.chain,
                floor=floor,
                refused=verdict.refused,
                reason="keyring_floor_unreadable",
                message=(
                    f"{self.floor_path} is unreadable: the highest keyring version verified on"
                    " this device is unknown, so no keyring is trusted for updates; an"
                    " administrator must remove the file to re-anchor at the verified chain"
                ),
            )
        if verdict.usable and verdict.keyring.version > floor:
            self.raise_floor(verdict.keyring.version)
        return verdict

    # -- writing ---------------------------------------------------------------------------
    def append(self, keyring: Keyring, data: bytes) -> None:
        """Keep an accepted rotation document (call after check_rotation), then raise the
        floor. The legacy keyring.json is refreshed last."""
        fsutil.make_dirs(self.chain_dir)
        fsutil.atomic_write(self.chain_dir / f"v{keyring.version}.json", data)
        self.raise_floor(keyring.version)
        fsutil.atomic_write(self.legacy, data)

    def raise_floor(self, version: int) -> None:
        cur = self.read_floor()
        if cur != FLOOR_UNREADABLE and version <= cur:
            return
        fsutil.make_dirs(self.upd_dir)
        fsutil.atomic_write(self.floor_path, json.dumps({"version": version}).encode() + b"\n")


def _read_capped(path: Path, *, strict: bool = False) -> bytes | None:
    """The file's bytes; None if missing (or, unless strict, unreadable or oversized)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if strict:
            raise TrustError("unreadable", f"{path}: {exc.strerror}") from None
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(DOC_MAX_BYTES + 1)
    except OSError as exc:  # a directory, an I/O error
        if strict:
            raise TrustError("unreadable", f"{path}: {exc.strerror}") from None
        return None
    if len(data) > DOC_MAX_BYTES:
        if strict:
            raise TrustError("too_large", f"{path}: larger than {DOC_MAX_BYTES} bytes")
        return None
    return data
