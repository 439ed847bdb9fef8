"""Serial device emulators on kernel pseudo-terminals.

Theory of operation
-------------------
`os.openpty()` gives a master/slave pair; the slave is a real tty (`/dev/pts/N`) that
pyserial opens, configures with termios and reads exactly as it would a USB adapter. The
emulator owns the master end: what it writes there, the driver reads from the slave, and
what the driver writes, the emulator reads. A stable symlink (e.g. ``tmp/ttyEMU0 ->
/dev/pts/7``) is the configured `port:`, as ``/dev/serial/by-id/...`` is on a gateway.

The emulator also keeps the slave end open itself, in raw mode: the tty then exists
before the driver opens it (no echo of our frames back into the master while nobody has
configured the line) and survives the driver closing and reopening it.

Everything runs on the event loop: reads of the master via `loop.add_reader`, periodic
frames from an asyncio task on absolute deadlines. Frames are written non-blocking; if
the pty buffer is full (nobody reads the port) the frame is dropped and counted, as a
UART without flow control would lose it.

Faults:
- corruption: `inject(kind, count)` corrupts the next `count` frames deterministically
  ("bit_flip": one bit flipped; "truncate": the frame's tail cut off, the delimiter
  kept so the stream goes on; "garbage": random bytes without delimiter sent before
  the frame), or set `Faults` rates for random corruption from a seeded RNG;
- `stall(seconds)` or `stall()`/`unstall()`: the device stays silent (a modbus slave
  does not answer);
- `unplug()`: closes both pty ends and removes the symlink: the driver's reads fail
  with EIO and a reopen finds no device node, as when a USB adapter is pulled;
  `replug()` creates a new pty and re-points the symlink.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

__all__ = ["FaultKind", "Faults", "PeriodicSerialDevice", "PtySerialDevice"]

_log = logging.getLogger(__name__)

FaultKind = Literal["bit_flip", "truncate", "garbage"]
_KINDS: tuple[FaultKind, ...] = ("bit_flip", "truncate", "garbage")


@dataclass
class Faults:
    """Random fault rates, per frame (0..1), drawn from the device's seeded RNG."""

    bit_flip: float = 0.0
    truncate: float = 0.0
    garbage: float = 0.0


class PtySerialDevice:
    """Base of every serial emulator: one pty, one symlink, fault injection.

    Subclasses override `on_receive(data)` (bytes the driver sent) and/or `run()` (the
    body of the device's task, e.g. a periodic sender).
    """

    def __init__(
        self,
        link: str | os.PathLike[str],
        *,
        seed: int = 0,
        faults: Faults | None = None,
        dropout: Callable[[float], bool] | None = None,
    ) -> None:
        self.link = Path(link)
        # dropout(t) -> True: silent at scenario time t (e.g. Scenario.is_dropout("gps", t))
        self.dropout = dropout
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self._master = -1
        self._slave = -1
        self._pts = ""
        self._pending: list[FaultKind] = []
        self._stalled_until = 0.0
        self._stalled = False
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.t0 = 0.0
        self.counters: dict[str, int] = {
            "frames_sent": 0,
            "frames_dropped": 0,
            "frames_corrupted": 0,
            "bytes_rx": 0,
            "unplugs": 0,
        }

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def path(self) -> str:
        """What the driver's config names as `port:`."""
        return str(self.link)

    @property
    def pts(self) -> str:
        return self._pts

    @property
    def plugged(self) -> bool:
        return self._master >= 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.t0 = self._loop.time()
        self._plug()
        self._task = asyncio.create_task(self._run_guarded(), name=f"emu:{self.link.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._unplug()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def now(self) -> float:
        """Seconds since start (the scenario's t)."""
        assert self._loop is not None
        return self._loop.time() - self.t0

    def _plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo / line discipline before the driver configures it
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._pts = os.ttyname(slave)
        self.link.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.link.with_name(self.link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self._pts)
        tmp.replace(self.link)  # atomic re-point
        assert self._loop is not None
        self._loop.add_reader(master, self._on_readable)

    def _unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        if self._master >= 0:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._master)
            os.close(self._master)
            self._master = -1
        if self._slave >= 0:
            os.close(self._slave)
            self._slave = -1

    def unplug(self) -> None:
        """Pull the cable: reads on the driver's side fail with EIO, the node is gone."""
        self.counters["unplugs"] += 1
        self._unplug()

    def replug(self) -> None:
        """Plug it back: a new pty behind the same symlink."""
        if self._master < 0:
            self._plug()

    # -- faults ------------------------------------------------------------------------
    def inject(self, kind: FaultKind, count: int = 1) -> None:
        self._pending.extend([kind] * count)

    def stall(self, seconds: float | None = None) -> None:
        """Go silent: for `seconds`, or until `unstall()`."""
        if seconds is None:
            self._stalled = True
        else:
            assert self._loop is not None
            self._stalled_until = self._loop.time() + seconds

    def unstall(self) -> None:
        self._stalled = False
        self._stalled_until = 0.0

    @property
    def stalled(self) -> bool:
        if self._stalled:
            return True
        if self._loop is None:
            return False
        if self.dropout is not None and self.dropout(self.now()):
            return True
        return self._loop.time() < self._stalled_until

    def _corrupt(self, frame: bytes, delimiter: bytes | None) -> bytes:
        kinds: list[FaultKind] = []
        if self._pending:
            kinds.append(self._pending.pop(0))
        else:
            for k in _KINDS:
                rate = getattr(self.faults, k)
                if rate and self.rng.random() < rate:
                    kinds.append(k)
        if not kinds:
            return frame
        self.counters["frames_corrupted"] += 1
        out = bytearray(frame)
        body_end = len(out) - (len(delimiter) if delimiter and out.endswith(delimiter) else 0)
        for k in kinds:
            if k == "bit_flip" and body_end > 0:
                i = self.rng.randrange(body_end)
                bit = self.rng.randrange(8)
                if delimiter and out[i] ^ (1 << bit) == delimiter[0]:
                    bit = (bit + 1) % 8  # keep the framing: flip a bit that makes no delimiter
                out[i] ^= 1 << bit
            elif k == "truncate" and body_end > 2:
                # cut at least two bytes so a frame never survives whole (CR + a digit)
                cut = self.rng.randrange(1, body_end - 1)
                out = out[:cut] + out[body_end:]
                body_end = cut
            elif k == "garbage":
                junk = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(8, 40)))
                if delimiter:
                    junk = junk.replace(delimiter, b"")
                out = bytearray(junk) + out
        return bytes(out)

    # -- I/O -----------------------------------------------------------------------------
    def send(self, frame: bytes, *, delimiter: bytes | None = None) -> bool:
        """Write one frame (with faults applied). False if it was not sent."""
        if self._master < 0 or self.stalled:
            self.counters["frames_dropped"] += 1
            return False
        data = self._corrupt(frame, delimiter)
        try:
            n = os.write(self._master, data)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EIO):
                self.counters["frames_dropped"] += 1
                return False
            raise
        if n < len(data):  # pty buffer full: the rest of the frame is lost, like a UART
            self.counters["frames_dropped"] += 1
            return False
        self.counters["frames_sent"] += 1
        return True

    def write_raw(self, data: bytes) -> None:
        """Bytes straight onto the line, no faults (tests: partial frames, noise)."""
        if self._master >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._master, data)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            data = b""
        if not data:
            return
        self.counters["bytes_rx"] += len(data)
        self.on_receive(data)

    def on_receive(self, data: bytes) -> None:
        """Bytes the driver wrote. Default: ignore."""

    async def _run_guarded(self) -> None:
        try:
            await self.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # a broken signal callable must be visible, not a silently dead device
            self.error = exc
            _log.exception("serial emulator %s crashed", self.link)
            raise

    async def run(self) -> None:
        """The device's own activity. Default: nothing (a pure request/response device)."""
        await asyncio.Event().wait()


class PeriodicSerialDevice(PtySerialDevice):
    """A device that talks on its own: `make_frames(t)` every 1/rate_hz on absolute deadlines.

    With `poll_command` set it instead answers each received line equal to the command
    with one `make_frames(t)` (an instrument polled with e.g. ``READ?``).
    """

    delimiter: bytes = b"\n"

    def __init__(
        self,
        link: str | os.PathLike[str],
        *,
        rate_hz: float,
        make_frames: Callable[[float], Sequence[bytes]] | None = None,
        poll_command: bytes | None = None,
        seed: int = 0,
        faults: Faults | None = None,
        dropout: Callable[[float], bool] | None = None,
    ) -> None:
        super().__init__(link, seed=seed, faults=faults, dropout=dropout)
        if rate_hz <= 0:
            raise ValueError("rate_hz must be > 0")
        self.rate_hz = rate_hz
        self._make = make_frames
        self.poll_command = poll_command
        self._rxbuf = bytearray()

    def frames_at(self, t: float) -> Sequence[bytes]:
        if self._make is None:
            raise NotImplementedError
        return self._make(t)

    def emit(self) -> None:
        if self.stalled or not self.plugged:
            self.counters["frames_dropped"] += 1
            return
        for frame in self.frames_at(self.now()):
            self.send(frame, delimiter=self.delimiter)

    def on_receive(self, data: bytes) -> None:
        if self.poll_command is None:
            return
        self._rxbuf += data
        cmd = self.poll_command.rstrip(b"\r\n")
        while b"\n" in self._rxbuf:
            line, _, rest = bytes(self._rxbuf).partition(b"\n")
            self._rxbuf = bytearray(rest)
            if line.rstrip(b"\r") == cmd:
                self.emit()
        if len(self._rxbuf) > 1024:
            self._rxbuf.clear()

    async def run(self) -> None:
        if self.poll_command is not None:
            await asyncio.Event().wait()
        loop = asyncio.get_running_loop()
        period = 1.0 / self.rate_hz
        next_t = loop.time()
        while True:
            self.emit()
            next_t += period
            now = loop.time()
            if next_t < now - period:  # fell far behind (loop busy): skip, do not burst
                next_t = now
            await asyncio.sleep(max(0.0, next_t - now))
