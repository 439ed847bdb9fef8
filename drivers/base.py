"""The contract between drivers and the daemon's SensorHub.

A configured device is built by its driver's factory from a typed config struct and the
shared `Resources` (one async I2C bus worker per bus number, one async serial port per
URL), and is then either *polled* (the hub calls `read()` on absolute deadlines at
`rate_hz`) or *streamed* (the hub iterates `frames()` for instruments that talk on
their own, e.g. NMEA GPS, line instruments).

Faults: a driver raises `DeviceError` for bus/port faults (NACK, EIO, timeout, device node
gone, wrong chip id) and `FrameError` for one bad frame (CRC, checksum, garbage); the hub
counts both, retries/backs off, and marks the sensor failed after `fail_after` consecutive
failures. Drivers never swallow a fault silently: they count it in `counters` too.

Acquisition time: a sample carries the instant the device was sampled, not the instant
its value reached the event loop. Under CPU load the hop from an I2C bus worker thread back
to the loop took up to 23 ms, and stamping at completion put that jitter into the model's
resampled windows (false anomalies). So the transport notes the start of the read's first
bus transaction with `note_acquired(time.monotonic())`: the I2C bus worker as it starts a
job, the serial port as it sends a request. The note lives in a context variable, i.e. in
the task that awaits the read, so drivers need do nothing and concurrent sensors never see
each other's notes. The hub calls `begin_acquisition()` before each read (and before each
stream frame), then stamps the samples with `acquired_at()`, or with the completion time
when no transport noted one (a stream frame assembled from bytes as they arrived). The
same instant on the wall clock is `time.time()` minus the monotonic time elapsed since.

Config structs are msgspec tagged unions on `driver:`; each driver's struct subclasses
`SensorConfig` with `tag="<driver name>"` and adds its own keys (units in key names).
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import msgspec

from drivers.errors import DeviceError, FrameError

__all__ = [
    "ActuatorConfig",
    "ActuatorDriver",
    "AsyncI2CBusLike",
    "AsyncSerialPortLike",
    "ChannelInfo",
    "DeviceError",
    "FrameError",
    "PolledSensor",
    "Quality",
    "Reading",
    "Resources",
    "Sample",
    "SelfTimedRead",
    "SensorConfig",
    "StreamSensor",
    "acquired_at",
    "begin_acquisition",
    "note_acquired",
]


class Quality(enum.IntEnum):
    GOOD = 0
    UNCERTAIN = 1  # plausible but suspicious (stuck, out of sensor range, stale fix)
    BAD = 2


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    name: str
    unit: str


@dataclass(frozen=True, slots=True)
class Reading:
    """One channel's value from one acquisition, as the driver returns it."""

    channel: str
    value: float
    quality: Quality = Quality.GOOD
    # How long before the read's acquisition instant the device sampled this value: 0 for
    # a register read now; a FIFO record k samples older than the newest carries k / ODR.
    # The hub stamps the sample that much earlier.
    age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Sample:
    """A reading stamped by the hub: what control loops and telemetry consume."""

    sensor_id: str
    channel: str
    t_mono: float  # time.monotonic() when the device was sampled (see acquired_at)
    t_wall: float  # time.time() at the same instant
    value: float
    unit: str
    quality: Quality = Quality.GOOD


# time.monotonic() at the start of the first bus transaction the current task awaited
# since it called begin_acquisition(); None: no transport noted one.
_ACQUIRED: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "drivers_acquired_mono", default=None
)


def begin_acquisition() -> None:
    """The hub, before a read: forget the previous read's instant."""
    _ACQUIRED.set(None)


def acquired_at() -> float | None:
    """When the current task's read sampled the device, if a transport noted it."""
    return _ACQUIRED.get()


def note_acquired(t_mono: float) -> None:
    """A transport, as a bus transaction starts: the first note since begin_acquisition
    is the read's instant (later transactions of the same read do not move it)."""
    if _ACQUIRED.get() is None:
        _ACQUIRED.set(t_mono)


class SensorConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="driver"):
    """Keys common to every sensor. Driver structs subclass this with `tag="name"`."""

    id: str
    enabled: bool = True
    rate_hz: float = 1.0
    read_timeout_ms: int = 500
    retries: int = 2  # immediate retries of one read before it counts as a failure
    fail_after: int = 3  # consecutive failed reads before the sensor is `failed`
    reprobe_s: float = 10.0  # how often a failed sensor is re-opened
    window: int = 1024  # samples kept per channel in the hub's ring buffer


class ActuatorConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="driver"):
    """Keys common to every actuator. Driver structs subclass this with `tag="name"`."""

    safe_value: float = 0.0  # applied at start, on shutdown and on fault
    write_timeout_ms: int = 200


T = TypeVar("T")


class AsyncI2CBusLike(Protocol):
    """One I2C bus, all transactions serialised on one worker thread (drivers/i2c/bus.py)."""

    bus_id: str

    async def read_block(self, addr: int, reg: int, length: int) -> bytes: ...
    async def read_registers(self, addr: int, regs: Sequence[int], length: int) -> list[bytes]: ...
    async def write_byte(self, addr: int, reg: int, value: int) -> None: ...
    async def write_block(self, addr: int, reg: int, data: bytes) -> None: ...
    async def transfer(
        self, addr: int, write: bytes, read_length: int, delay_s: float = 0.0
    ) -> bytes: ...
    async def call(self, fn: Callable[[Any], T]) -> T: ...


class AsyncSerialPortLike(Protocol):
    """One serial port driven by the event loop (drivers/serial/port.py)."""

    url: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def write(self, data: bytes) -> None: ...
    async def read_some(self, max_bytes: int = 4096) -> bytes: ...


class Resources(Protocol):
    """Shared transports, created lazily by the hub and closed by it."""

    def i2c_bus(self, bus: int) -> AsyncI2CBusLike: ...
    def serial_port(self, url: str, **settings: Any) -> AsyncSerialPortLike: ...


@runtime_checkable
class PolledSensor(Protocol):
    mode: Literal["poll"]
    channels: Sequence[ChannelInfo]
    counters: dict[str, int]

    async def open(self) -> None: ...
    async def read(self) -> Sequence[Reading]: ...
    async def close(self) -> None: ...


@runtime_checkable
class SelfTimedRead(Protocol):
    """A polled sensor that bounds every device exchange itself by `read_timeout_ms`.

    Such a driver knows what a timeout means and says it in its own words (Modbus:
    `no response within 300 ms` naming unit and function), and one of its reads may hold
    several exchanges. `read_deadline_s` is the longest one `read()` can take when every
    exchange times out; the hub's own `read_timeout_ms` timer would otherwise fire first
    (same length, started earlier) and replace the driver's message with a bare
    `read timed out`, and its no-retry-after-timeout rule would skip `retries`. For these
    drivers the hub's timer is a backstop at `read_deadline_s` plus a margin.
    """

    read_deadline_s: float

    def set_read_timeout(self, timeout_s: float) -> None:
        """A live change of `read_timeout_ms` (SIGHUP, twin): bound exchanges from the next."""
        ...


@runtime_checkable
class StreamSensor(Protocol):
    mode: Literal["stream"]
    channels: Sequence[ChannelInfo]
    counters: dict[str, int]

    async def open(self) -> None: ...
    def frames(self) -> AsyncIterator[Sequence[Reading]]: ...
    async def close(self) -> None: ...


class ActuatorDriver(Protocol):
    async def open(self) -> None: ...
    async def write(self, value: float) -> None: ...
    async def close(self) -> None: ...
