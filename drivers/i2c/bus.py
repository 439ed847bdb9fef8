"""One asyncio-facing I2C bus whose transactions all run on one worker thread.

Theory of operation
-------------------
An I2C bus carries one transaction at a time, and the Linux i2c-dev interface
(`/dev/i2c-N`, driven here through smbus2) is a blocking ioctl per transaction: a 14-byte
read costs ~1.6 ms at 100 kHz and a NACKing or clock-stretching device can hold the call
far longer. Calling it on the event loop would stall every control loop, so each bus gets
exactly one worker thread. Every transaction from every driver on that bus is submitted to
that thread, which both keeps the loop free and serialises the bus in FIFO order without
any lock: two coroutines reading two devices on the same bus interleave whole
transactions, never bytes.

The hop is built for a hot path (hundreds of transactions per second per bus), not on a
`ThreadPoolExecutor`: the loop puts `(future, job)` on a `queue.SimpleQueue` (one C-level
lock, no work-item and `concurrent.futures.Future` per call, no `wrap_future` chaining),
and the worker resolves the loop's own `asyncio.Future` through
`loop.call_soon_threadsafe`, which a busy loop coalesces into one wake-up. The worker
takes every job already queued before it sleeps again, so several sensors due at the same
deadline share one worker wake-up. Measured with the emulators this halves the loop-side
cost of a transaction against `run_in_executor` (benchmarks/acquisition.py).

The smbus-like object (a real `smbus2.SMBus(n)` or an `EmulatedSMBus`) is created lazily
*in the worker* by the `opener`, so opening `/dev/i2c-N` (which can block on a busy
adapter) never runs on the loop either, and a bus whose adapter vanished (ENODEV, a USB
I2C adapter unplugged) is closed and re-opened on the next transaction.

Faults: the kernel reports an address NACK as ENXIO (or EREMOTEIO on the Raspberry Pi's
bcm2835 adapter), a data NACK as EREMOTEIO or EIO, a stuck bus as ETIMEDOUT. Each OSError
becomes an `I2CError` (a `DeviceError`) naming the bus, address, register and operation,
so the hub's log line says which wire to check. Nothing is retried here: retry policy
belongs to the hub (per sensor, from the config).

Sample time: the worker notes `time.monotonic()` as each transaction starts, and the
awaiting coroutine reports it through the driver contract's `note_acquired`
(drivers/base.py: the first transaction since the hub's `begin_acquisition` is the read's
instant). Under CPU load the hop back to the event loop can take several milliseconds
(p99 ~7 ms with the CPU oversubscribed), and a completion-time stamp would carry that as
timing noise into anything that uses sample times (the anomaly model's resampling,
docs/inference.md).

A cancelled awaiter (the hub's read timeout) cancels its job if the job has not started:
the worker checks the future before running it, so no stale transaction reaches the wire
later. A transaction already running cannot be interrupted (an ioctl); it completes, its
result is dropped, and later jobs queue behind it, which is the correct order for the bus
anyway.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from drivers.base import note_acquired
from drivers.errors import DeviceError

__all__ = ["AsyncI2CBus", "I2CError", "SMBusLike", "open_real_bus"]

T = TypeVar("T")

I2C_SMBUS_BLOCK_MAX = 32  # the SMBus I2C-block transfer limit; longer reads use i2c_rdwr

# errnos after which the file descriptor itself is suspect: close and re-open next time
_REOPEN_ERRNOS = frozenset({errno_mod.ENODEV, errno_mod.EBADF, errno_mod.ESHUTDOWN})


class SMBusLike(Protocol):
    """The subset of smbus2.SMBus that drivers, the scanner and the emulator share."""

    def read_byte(self, i2c_addr: int, force: bool | None = None) -> int: ...
    def write_quick(self, i2c_addr: int, force: bool | None = None) -> None: ...
    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int: ...
    def write_byte_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None: ...
    def read_word_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int: ...
    def write_word_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None: ...
    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]: ...
    def write_i2c_block_data(
        self, i2c_addr: int, register: int, data: Sequence[int], force: bool | None = None
    ) -> None: ...
    def i2c_rdwr(self, *i2c_msgs: Any) -> None: ...
    def close(self) -> None: ...


class I2CError(DeviceError):
    """An I2C transaction failed. Carries where, so the hub and the log can say it."""

    def __init__(
        self,
        bus_id: str,
        addr: int,
        reg: int | None,
        op: str,
        err: int | None,
        detail: str,
    ) -> None:
        self.bus_id = bus_id
        self.addr = addr
        self.reg = reg
        self.op = op
        self.errno = err
        where = f"i2c bus {bus_id} addr 0x{addr:02x}"
        if reg is not None:
            where += f" reg 0x{reg:02x}"
        name = errno_mod.errorcode.get(err, str(err)) if err is not None else "error"
        hint = _HINTS.get(err or 0, "")
        super().__init__(f"{where}: {op} failed: {name} ({detail}){hint}")

    @property
    def is_nack(self) -> bool:
        return self.errno in (errno_mod.ENXIO, errno_mod.EREMOTEIO, errno_mod.EIO)


_HINTS = {
    errno_mod.ENXIO: "; no ACK: device absent, unpowered, wrong address or missing pull-ups",
    errno_mod.EREMOTEIO: "; NACK: device absent/busy or wrong address",
    errno_mod.ETIMEDOUT: "; bus timeout: SDA/SCL held low or clock stretching too long",
    errno_mod.ENOENT: "; no such adapter: enable I2C (dtparam=i2c_arm=on) and check the bus number",
    errno_mod.EACCES: "; permission denied: add the service user to the i2c group",
}


_perf = time.perf_counter
_mono = time.monotonic
_STOP = None  # the worker's sentinel


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """On the loop: hand a worker's outcome to the awaiter, unless it gave up already."""
    if fut.done():  # cancelled by a read timeout while the transaction ran: drop it
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


class AsyncI2CBus:
    """`AsyncI2CBusLike` over any smbus2-compatible object, on one worker thread.

    `opener` builds the smbus object; it is called in the worker on first use and again
    after the adapter disappeared. `bus_id` names the bus in errors ("1", "emu-1").
    """

    def __init__(self, opener: Callable[[], SMBusLike], bus_id: str) -> None:
        self.bus_id = bus_id
        self._opener = opener
        self._smbus: SMBusLike | None = None
        # (future, fn, addr, reg, op) jobs, or _STOP; the worker starts on first use
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Written by the worker only, read by stats(): plain attributes (a torn read of a
        # counter pair is harmless for a status display; no lock on the hot path).
        self.transactions = 0
        self.errors = 0
        self.busy_s = 0.0  # worker time spent in transactions (bus utilisation)
        self._pending = 0  # loop side only

    @classmethod
    def from_smbus(cls, smbus: SMBusLike, bus_id: str) -> AsyncI2CBus:
        """Wrap an already-built smbus object (an emulated bus, a test double)."""
        return cls(lambda: smbus, bus_id)

    # -- the worker side ---------------------------------------------------------------

    def _ensure_open(self) -> SMBusLike:
        if self._smbus is None:
            self._smbus = self._opener()
        return self._smbus

    def _run(self, fn: Callable[[SMBusLike], T], addr: int, reg: int | None, op: str) -> T:
        t0 = _perf()
        try:
            bus = self._smbus
            if bus is None:
                try:
                    bus = self._ensure_open()
                except OSError as exc:
                    raise I2CError(self.bus_id, addr, reg, "open", exc.errno, str(exc)) from exc
            try:
                return fn(bus)
            except OSError as exc:
                if exc.errno in _REOPEN_ERRNOS:
                    self._drop_bus()
                raise I2CError(
                    self.bus_id,
                    addr,
                    getattr(exc, "i2c_reg", reg),
                    op,
                    exc.errno,
                    exc.strerror or os.strerror(exc.errno or 0),
                ) from exc
        except I2CError:
            self.errors += 1
            raise
        finally:
            self.transactions += 1
            self.busy_s += _perf() - t0

    def _drop_bus(self) -> None:
        bus, self._smbus = self._smbus, None
        if bus is not None:
            try:
                bus.close()
            except OSError:
                pass

    def _worker(self) -> None:
        """The bus's thread: run jobs in FIFO order until the sentinel."""
        get = self._jobs.get
        run = self._run
        while True:
            job = get()  # blocks (GIL released) until there is work
            if job is _STOP:
                return
            fut, fn, addr, reg, op, started = job
            if fut.cancelled():  # its awaiter timed out before the job started
                continue
            if started is not None:
                started[0] = _mono()  # the sample time the awaiter publishes
            result: Any = None
            exc: BaseException | None = None
            try:
                # fn None: close() asking to release the adapter after the queued jobs
                if fn is not None:
                    result = run(fn, addr, reg, op)
                else:
                    self._drop_bus()
            except BaseException as e:  # every outcome goes back to the loop
                exc = e
            try:
                fut.get_loop().call_soon_threadsafe(_settle, fut, result, exc)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            del job, fut, fn, result, exc  # do not keep the last job's objects alive

    def _start(self) -> None:
        t = threading.Thread(target=self._worker, name=f"i2c-{self.bus_id}", daemon=True)
        t.start()
        self._thread = t

    def _submit(
        self,
        fn: Callable[[SMBusLike], T] | None,
        addr: int,
        reg: int | None,
        op: str,
        started: list[float] | None = None,
    ) -> asyncio.Future[T]:
        """Queue one job; the returned future is the loop's own (cancel = skip the job)."""
        if self._closed:
            raise I2CError(self.bus_id, addr, reg, op, errno_mod.ESHUTDOWN, "bus is closed")
        if self._thread is None:
            self._start()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((fut, fn, addr, reg, op, started))
        return fut

    async def _call(self, fn: Callable[[SMBusLike], T], addr: int, reg: int | None, op: str) -> T:
        started = [0.0]
        fut = self._submit(fn, addr, reg, op, started)
        self._pending += 1
        try:
            # A caller cancelled (its read timeout) before the job started also cancels
            # the job: no stale transaction runs later. One already on the wire finishes.
            result = await fut
        finally:
            self._pending -= 1
        note_acquired(started[0])
        return result

    # -- AsyncI2CBusLike -----------------------------------------------------------------

    async def read_block(self, addr: int, reg: int, length: int) -> bytes:
        """Write the register pointer, repeated start, read `length` bytes."""
        if length <= I2C_SMBUS_BLOCK_MAX:

            def op(b: SMBusLike) -> bytes:
                return bytes(b.read_i2c_block_data(addr, reg, length))

        else:

            def op(b: SMBusLike) -> bytes:
                return _rdwr(b, addr, bytes([reg]), length)

        return await self._call(op, addr, reg, f"read {length} bytes")

    async def read_registers(self, addr: int, regs: Sequence[int], length: int) -> list[bytes]:
        """Read `length` bytes from each register in turn, as ONE worker job.

        For parts without register auto-increment (INA219: five 2-byte registers, each
        its own pointer write + read), so one sample costs one hop to the worker instead
        of one per register. Still one wire transaction per register; nothing else on the
        bus runs between them, which also makes the registers one coherent snapshot. An
        error names the register that failed.
        """
        regs = tuple(regs)
        if not regs:
            return []

        def op(b: SMBusLike) -> list[bytes]:
            out: list[bytes] = []
            for r in regs:
                try:
                    out.append(bytes(b.read_i2c_block_data(addr, r, length)))
                except OSError as exc:
                    exc.i2c_reg = r  # type: ignore[attr-defined]  # for _run's error
                    raise
            self.transactions += len(regs) - 1  # _run counts the job as one
            return out

        return await self._call(op, addr, regs[0], f"read {length} bytes")

    async def read_byte_data(self, addr: int, reg: int) -> int:
        return await self._call(lambda b: int(b.read_byte_data(addr, reg)), addr, reg, "read byte")

    async def write_byte(self, addr: int, reg: int, value: int) -> None:
        await self._call(
            lambda b: b.write_byte_data(addr, reg, value & 0xFF), addr, reg, "write byte"
        )

    async def write_block(self, addr: int, reg: int, data: bytes) -> None:
        payload = list(data)
        if len(payload) <= I2C_SMBUS_BLOCK_MAX:
            await self._call(
                lambda b: b.write_i2c_block_data(addr, reg, payload),
                addr,
                reg,
                f"write {len(payload)} bytes",
            )
        else:
            await self._call(
                lambda b: _rdwr(b, addr, bytes([reg, *payload]), 0),
                addr,
                reg,
                f"write {len(payload)} bytes",
            )

    async def transfer(
        self, addr: int, write: bytes, read_length: int, delay_s: float = 0.0
    ) -> bytes:
        """Raw I2C: write `write` (if any), then read `read_length` bytes (if any).

        Without a delay both messages form one combined transaction (repeated start).
        With `delay_s` (a command that needs conversion time, e.g. Sensirion parts), the
        write and the read are two transactions and the wait happens on the event loop,
        so other devices on the bus are served meanwhile.
        """
        reg = write[0] if write else None
        if delay_s > 0 and write and read_length:
            await self._call(lambda b: _rdwr(b, addr, write, 0), addr, reg, "write command")
            await asyncio.sleep(delay_s)
            return await self._call(
                lambda b: _rdwr(b, addr, b"", read_length),
                addr,
                reg,
                f"read {read_length} bytes",
            )
        return await self._call(lambda b: _rdwr(b, addr, write, read_length), addr, reg, "transfer")

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(smbus)` on the worker (scanning, odd protocols). OSError -> I2CError."""
        return await self._call(fn, 0, None, getattr(fn, "__name__", "call"))

    async def call_at(self, fn: Callable[[Any], T], addr: int, op: str) -> T:
        """Like `call`, with the address named in errors."""
        return await self._call(fn, addr, None, op)

    # -- life cycle and status ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "bus": self.bus_id,
            "transactions": self.transactions,
            "errors": self.errors,
            "busy_s": round(self.busy_s, 6),
            "queued": self._pending,
            "open": self._smbus is not None,
        }

    async def close(self) -> None:
        """Let queued transactions finish, close the adapter, stop the worker."""
        if self._closed:
            return
        if self._thread is not None:
            fut: asyncio.Future[None] = self._submit(None, 0, None, "close")
            self._closed = True
            self._jobs.put(_STOP)
            await fut
        else:
            self._closed = True
            self._drop_bus()


def _rdwr(bus: SMBusLike, addr: int, write: bytes, read_length: int) -> bytes:
    """One combined transaction through I2C_RDWR: [write msg] [read msg]."""
    from smbus2 import i2c_msg  # local: only this path needs the ctypes structures

    msgs: list[Any] = []
    if write:
        msgs.append(i2c_msg.write(addr, write))
    rd = None
    if read_length:
        rd = i2c_msg.read(addr, read_length)
        msgs.append(rd)
    if not msgs:  # a zero-length write: the SMBus quick command
        bus.write_quick(addr)
        return b""
    bus.i2c_rdwr(*msgs)
    return bytes(rd) if rd is not None else b""


def open_real_bus(n: int) -> AsyncI2CBus:
    """The kernel's `/dev/i2c-<n>` through smbus2, opened lazily on the worker thread."""
    if not 0 <= n <= 255:
        raise ValueError(f"I2C bus number must be 0..255, got {n}")

    def opener() -> SMBusLike:
        import smbus2

        bus: SMBusLike = smbus2.SMBus(n)
        return bus

    return AsyncI2CBus(opener, str(n))
