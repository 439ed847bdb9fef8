"""The device's security counter (anti-rollback reference), raised only after COMMITTED.

Where identity is a TPM the counter is its NV counter (`identity.counter_read()` /
`counter_increment()`): it can only go up, even for root, which is what makes rollback
protection survive a re-flashed SD card's state directory. Otherwise it is a small file
under the state directory written atomically; that is best-effort (root can edit it) and
documented as such.

`ratchet(target)` makes the counter max(stored, target); doing it twice changes nothing,
so start-up recovery simply redoes it after a crash between COMMITTED and the ratchet.

A counter may be REFUSED (`refusal` is a reason, not None): when the identity is the
software fallback for a TPM that was missing at boot, the real counter is in the absent TPM
and a file counter starting at 0 would accept any old bundle. `select_counter` returns a
`RefusedCounter` then, whose read/ratchet raise DeviceError(reason): updates must be
refused with that reason (and show it in status), never applied against a counter of 0.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edgerund.errors import DeviceError
from edgerund.updates import fsutil

if TYPE_CHECKING:
    from edgerund.config.schema import Config
    from edgerund.ports import Counter


class NvCounterIdentity(Protocol):
    """What the counter needs of the identity (a TPM NV counter when kind == "tpm")."""

    @property
    def kind(self) -> str: ...

    @property
    def counter_refusal(self) -> str | None: ...

    async def counter_read(self) -> int: ...

    async def counter_increment(self) -> int: ...


class FileCounter:
    kind = "file"
    refusal: str | None = None

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> int:
        try:
            return int(self.path.read_text().strip() or "0")
        except FileNotFoundError:
            return 0

    async def read(self) -> int:
        return await asyncio.to_thread(self._read)

    def _ratchet(self, target: int) -> int:
        cur = self._read()
        if target <= cur:
            return cur
        fsutil.make_dirs(self.path.parent)
        fsutil.atomic_write(self.path, f"{target}\n".encode())
        return target

    async def ratchet(self, target: int) -> int:
        return await asyncio.to_thread(self._ratchet, target)


class IdentityCounter:
    """The identity component's monotonic counter (TPM NV counter)."""

    kind = "tpm"

    def __init__(self, identity: NvCounterIdentity, max_steps: int) -> None:
        self._id = identity
        self._max_steps = max_steps

    @property
    def refusal(self) -> str | None:
        reason = self._id.counter_refusal
        return None if reason is None else str(reason)

    async def read(self) -> int:
        return int(await self._id.counter_read())

    async def ratchet(self, target: int) -> int:
        cur = int(await self._id.counter_read())
        steps = 0
        # An NV counter only increments by one; the trust check bounds the distance by
        # max_counter_jump, and this bound keeps a bug from spinning the TPM forever.
        while cur < target and steps < self._max_steps:
            cur = int(await self._id.counter_increment())
            steps += 1
        return cur


class RefusedCounter:
    """No trustworthy counter: every use raises DeviceError(reason)."""

    kind = "refused"

    def __init__(self, reason: str) -> None:
        self.refusal: str | None = reason
        self.reason = reason

    async def read(self) -> int:
        raise DeviceError(f"anti-rollback counter unavailable: {self.reason}")

    async def ratchet(self, target: int) -> int:
        raise DeviceError(f"anti-rollback counter unavailable: {self.reason}")


def select_counter(
    identity: NvCounterIdentity | None, file_path: Path, max_steps: int
) -> FileCounter | IdentityCounter | RefusedCounter:
    """The counter for this identity: TPM NV, refused (TPM fallback), or the file."""
    if identity is not None and identity.kind == "tpm":
        return IdentityCounter(identity, max_steps)
    reason = identity.counter_refusal if identity is not None else None
    if reason:
        return RefusedCounter(str(reason))
    return FileCounter(file_path)


def counter_for(cfg: Config, identity: NvCounterIdentity | None) -> Counter:
    """The TPM NV counter when the identity is a TPM; a RefusedCounter when the identity
    says the counter cannot be trusted (TPM missing, software fallback); else the file."""
    u = cfg.updates
    path = Path(u.counter_file)
    return select_counter(
        identity,
        path if path.is_absolute() else Path(cfg.paths.state_dir) / path,
        max(1000, u.max_counter_jump),
    )
