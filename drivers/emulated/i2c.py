"""An in-process I2C bus with register-level device emulators behind smbus2's API.

Theory of operation
-------------------
Every smbus2 call is translated into what actually travels on the wire: a list of I2C
messages forming one transaction (START, then for each message the address byte and the
data, repeated STARTs between messages, STOP). `read_byte_data(a, r)` is `[write r]
[read 1]`, `write_word_data(a, r, v)` is `[write r, lo, hi]`, `i2c_rdwr` passes its
`smbus2.i2c_msg` list through, `write_quick` is a write of zero bytes. The device
attached at the address receives the messages through `EmulatedDevice.transaction`,
exactly as a real slave sees them: writes set a register pointer or issue a command,
reads return bytes from the pointer (or a command's response).

A message to an address with no device gets the kernel's answer for an address NACK,
`OSError(ENXIO)` (configurable: the Raspberry Pi's i2c-bcm2835 reports EREMOTEIO).

`EmulatedDevice` carries the faults every emulator supports:
- `inject_nack(n)`: the next n transactions are NACKed at the address phase;
- `stuck = True`: measurement registers stop updating (the bytes freeze);
- `inject_bit_flips(n, byte_index, bit)`: the next n read messages come back with a bit
  flipped (so CRCs fail on Sensirion parts, and values jump on the others);
- `unplug()` / `replug()`: the device disappears (every transaction NACKs) and comes back
  in its power-on state, so a driver has to re-initialise it;
- `stall_s`: every transaction takes this long (clock stretching, a slow bus);
- `online(t)`: an optional callable (e.g. the scenario's dropout) that takes the device
  off the bus while it returns False.
Devices are called from the bus worker thread while tests inject faults from the event
loop thread, so each device guards its state with a lock.

Timing: `scl_hz` makes every transaction sleep for its wire time, 9 clocks per byte
plus start/stop (the research note's table: a 14-byte MPU-6050 read is 1.56 ms at 100 kHz),
so benchmarks see realistic bus occupancy. Default None: no wire time.
"""

from __future__ import annotations

import ctypes
import errno
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from drivers.errors import EdgerundError

__all__ = [
    "Clock",
    "EmulatedDevice",
    "EmulatedSMBus",
    "Nack",
    "RegisterDevice",
    "RegisterFile",
    "Signal",
    "SignalLike",
    "WordRegisterDevice",
    "as_signal",
    "constant",
]

Clock = Callable[[], float]
Signal = Callable[[float], float]

I2C_M_RD = 0x0001


SignalLike = Signal | float


def as_signal(source: SignalLike) -> Signal:
    """A number means a constant signal; a callable is used as is."""
    return constant(float(source)) if isinstance(source, int | float) else source


def constant(value: float) -> Signal:
    """A signal source that always returns `value` (the default physical input)."""

    def signal(_t: float) -> float:
        return value

    return signal


class Nack(EdgerundError):
    """Raised by a device to NACK: at the address phase (absent/busy) or a data byte."""

    def __init__(self, phase: str = "address") -> None:
        self.phase = phase
        super().__init__(phase)


# A message as the device sees it: ("w", payload) or ("r", length).
Message = tuple[str, Any]


class EmulatedDevice:
    """Base class of every emulated I2C slave: faults, lock, message dispatch."""

    part = "generic"

    def __init__(
        self,
        address: int,
        *,
        clock: Clock = time.monotonic,
        online: Callable[[float], bool] | None = None,
    ) -> None:
        if not 0x00 <= address <= 0x7F:
            raise ValueError(f"address {address:#x} is not 7-bit")
        self.address = address
        self.clock = clock
        self.online = online
        self.lock = threading.RLock()
        self.stuck = False
        self.stall_s = 0.0
        self.plugged = True
        self._nacks = 0
        self._flips: list[tuple[int, int]] = []
        self.transactions = 0
        self.power_on_reset()

    # -- fault injection (any thread) ------------------------------------------------------

    def inject_nack(self, count: int = 1) -> None:
        with self.lock:
            self._nacks += count

    def inject_bit_flips(self, count: int = 1, byte_index: int = 0, bit: int = 0) -> None:
        """Flip `bit` of byte `byte_index` in each of the next `count` read messages."""
        with self.lock:
            self._flips.extend([(byte_index, bit)] * count)

    def unplug(self) -> None:
        with self.lock:
            self.plugged = False

    def replug(self) -> None:
        """Back on the bus, in the power-on state (a driver must configure it again)."""
        with self.lock:
            self.plugged = True
            self.stuck = False
            self.power_on_reset()

    # -- what subclasses implement ---------------------------------------------------------

    def power_on_reset(self) -> None:
        """Put every register in its datasheet power-on value."""

    def on_write(self, data: bytes) -> None:
        """A write message (may be empty: the quick command)."""

    def on_read(self, length: int) -> bytes:
        """A read message: return exactly `length` bytes."""
        return b"\xff" * length

    def on_transaction_start(self) -> None:
        """Called once per transaction after the address was ACKed (time-driven updates)."""

    # -- the bus side ------------------------------------------------------------------------

    def transaction(self, msgs: Sequence[Message]) -> list[bytes]:
        if self.stall_s > 0:
            time.sleep(self.stall_s)  # on the bus worker thread, as a stretched clock would
        with self.lock:
            if not self.plugged:
                raise Nack("address")
            if self.online is not None and not self.online(self.clock()):
                raise Nack("address")
            if self._nacks > 0:
                self._nacks -= 1
                raise Nack("address")
            self.transactions += 1
            self.on_transaction_start()
            out: list[bytes] = []
            for kind, arg in msgs:
                if kind == "w":
                    self.on_write(bytes(arg))
                else:
                    data = self.on_read(int(arg))
                    if self._flips and data:
                        flipped = bytearray(data)
                        idx, bit = self._flips.pop(0)
                        flipped[min(idx, len(flipped) - 1)] ^= 1 << (bit & 7)
                        data = bytes(flipped)
                    out.append(data)
            return out


class RegisterDevice(EmulatedDevice):
    """8-bit register map with an auto-incrementing pointer (BME280, MPU-6050 style).

    Subclasses keep static registers in `regs` and override `read_reg`/`write_reg` for
    registers with side effects; `before_read` runs once per read message so a burst read
    returns one coherent snapshot (the data-register shadowing the datasheets describe).

    A read inside `plain_read` (registers without read side effects, the pointer
    auto-incrementing) is copied out of `regs` in one slice instead of byte by byte
    through `read_reg`: the emulators' Python runs on the bus worker thread holding the
    GIL, which a kernel I2C transfer would not, so its cost is kept small. None (the
    default) means every register when `read_reg` and `next_ptr` are this class's own,
    none otherwise: a subclass with side effects names its plain window.
    """

    plain_read: range | None = None

    def power_on_reset(self) -> None:
        self.regs = bytearray(256)
        self.ptr = 0

    def read_reg(self, reg: int) -> int:
        return self.regs[reg & 0xFF]

    def write_reg(self, reg: int, value: int) -> None:
        self.regs[reg & 0xFF] = value & 0xFF

    def before_read(self, reg: int, length: int) -> None:
        """Hook: refresh measurement registers before a read from `reg`."""

    def next_ptr(self, reg: int) -> int:
        return (reg + 1) & 0xFF

    def on_write(self, data: bytes) -> None:
        if not data:
            return
        self.ptr = data[0]
        for b in data[1:]:
            self.write_reg(self.ptr, b)
            self.ptr = self.next_ptr(self.ptr)

    def _is_plain(self, start: int, end: int) -> bool:
        w = self.plain_read
        if w is None:
            cls = type(self)
            return (
                cls.read_reg is RegisterDevice.read_reg and cls.next_ptr is RegisterDevice.next_ptr
            )
        return w.start <= start and end <= w.stop

    def on_read(self, length: int) -> bytes:
        self.before_read(self.ptr, length)
        start = self.ptr
        end = start + length
        if end <= 256 and self._is_plain(start, end):
            self.ptr = end & 0xFF
            return bytes(self.regs[start:end])
        out = bytearray()
        for _ in range(length):
            out.append(self.read_reg(self.ptr) & 0xFF)
            self.ptr = self.next_ptr(self.ptr)
        return bytes(out)


class RegisterFile(RegisterDevice):
    """A plain 256-byte register file (a DAC/IO-expander stand-in for actuator tests)."""

    part = "register-file"

    def __init__(self, address: int, **kw: Any) -> None:
        super().__init__(address, **kw)
        self.writes: list[tuple[int, int]] = []

    def write_reg(self, reg: int, value: int) -> None:
        super().write_reg(reg, value)
        self.writes.append((reg, value & 0xFF))


class WordRegisterDevice(EmulatedDevice):
    """16-bit big-endian registers behind a pointer byte (ADS1115, INA219 style).

    A write of [ptr] selects a register, [ptr, msb, lsb] writes it; a read returns the
    selected register's two bytes (more bytes repeat it, as these parts do not
    auto-increment).
    """

    def power_on_reset(self) -> None:
        self.ptr = 0

    def read_word(self, reg: int) -> int:
        return 0

    def write_word(self, reg: int, value: int) -> None:
        """Writes to unknown/read-only registers are ignored, as the parts do."""

    def on_write(self, data: bytes) -> None:
        if not data:
            return
        self.ptr = data[0]
        if len(data) >= 3:
            self.write_word(self.ptr, (data[1] << 8) | data[2])

    def on_read(self, length: int) -> bytes:
        word = self.read_word(self.ptr) & 0xFFFF
        pair = bytes([word >> 8, word & 0xFF])
        return (pair * ((length + 1) // 2))[:length]


class EmulatedSMBus:
    """smbus2.SMBus's methods, dispatched to emulated devices by address."""

    def __init__(
        self,
        devices: Iterable[EmulatedDevice] = (),
        *,
        nack_errno: int = errno.ENXIO,
        scl_hz: float | None = None,
    ) -> None:
        self.nack_errno = nack_errno
        self.scl_hz = scl_hz
        self._devices: dict[int, EmulatedDevice] = {}
        self._lock = threading.Lock()
        self.close_count = 0  # close() is harmless: the next call "re-opens" the node
        self.transactions = 0
        for d in devices:
            self.attach(d)

    def attach(self, device: EmulatedDevice) -> EmulatedDevice:
        with self._lock:
            if device.address in self._devices:
                raise ValueError(f"address 0x{device.address:02x} already taken on this bus")
            self._devices[device.address] = device
        return device

    def detach(self, address: int) -> None:
        with self._lock:
            self._devices.pop(address, None)

    def device(self, address: int) -> EmulatedDevice | None:
        return self._devices.get(address)

    @property
    def addresses(self) -> list[int]:
        return sorted(self._devices)

    # -- the transaction engine ----------------------------------------------------------------

    def _xfer(self, addr: int, msgs: Sequence[Message]) -> list[bytes]:
        if not 0 <= addr <= 0x7F:
            raise OSError(errno.EINVAL, f"invalid 7-bit address {addr}")
        with self._lock:
            self.transactions += 1
            dev = self._devices.get(addr)
        if self.scl_hz:
            nbytes = sum(len(a) if k == "w" else int(a) for k, a in msgs) + len(msgs)
            time.sleep((9 * nbytes + 2 * len(msgs) + 1) / self.scl_hz)
        if dev is None:
            raise OSError(self.nack_errno, "No such device or address (no ACK)")
        try:
            return dev.transaction(msgs)
        except Nack as n:
            code = self.nack_errno if n.phase == "address" else errno.EREMOTEIO
            raise OSError(code, f"NACK at {n.phase} phase from 0x{addr:02x}") from None

    # -- smbus2.SMBus API ----------------------------------------------------------------------------

    def write_quick(self, i2c_addr: int, force: bool | None = None) -> None:
        self._xfer(i2c_addr, [("w", b"")])

    def read_byte(self, i2c_addr: int, force: bool | None = None) -> int:
        return self._xfer(i2c_addr, [("r", 1)])[0][0]

    def write_byte(self, i2c_addr: int, value: int, force: bool | None = None) -> None:
        self._xfer(i2c_addr, [("w", bytes([value & 0xFF]))])

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        return self._xfer(i2c_addr, [("w", bytes([register])), ("r", 1)])[0][0]

    def write_byte_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None:
        self._xfer(i2c_addr, [("w", bytes([register, value & 0xFF]))])

    def read_word_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        data = self._xfer(i2c_addr, [("w", bytes([register])), ("r", 2)])[0]
        return data[0] | (data[1] << 8)  # SMBus words are little-endian on the wire

    def write_word_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None:
        self._xfer(i2c_addr, [("w", bytes([register, value & 0xFF, (value >> 8) & 0xFF]))])

    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]:
        if length > 32:
            raise ValueError("Desired block length over 32 bytes")
        return list(self._xfer(i2c_addr, [("w", bytes([register])), ("r", length)])[0])

    def write_i2c_block_data(
        self, i2c_addr: int, register: int, data: Sequence[int], force: bool | None = None
    ) -> None:
        if len(data) > 32:
            raise ValueError("Data length cannot exceed 32 bytes")
        self._xfer(i2c_addr, [("w", bytes([register, *data]))])

    def i2c_rdwr(self, *i2c_msgs: Any) -> None:
        """Combined transaction of smbus2.i2c_msg structures (one address, as drivers use)."""
        if not i2c_msgs:
            return
        addrs = {int(m.addr) for m in i2c_msgs}
        if len(addrs) != 1:
            raise OSError(errno.EOPNOTSUPP, "emulated i2c_rdwr: one address per transaction")
        msgs: list[Message] = []
        for m in i2c_msgs:
            if m.flags & I2C_M_RD:
                msgs.append(("r", int(m.len)))
            else:
                msgs.append(("w", bytes(m)))
        replies = iter(self._xfer(addrs.pop(), msgs))
        for m in i2c_msgs:
            if m.flags & I2C_M_RD:
                data = next(replies)
                ctypes.memmove(m.buf, data, len(data))

    def close(self) -> None:
        self.close_count += 1
