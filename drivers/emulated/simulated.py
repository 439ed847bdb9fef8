"""Simulated wiring: `Resources` whose buses and ports lead to emulated devices.

Theory of operation
-------------------
`SimResources` implements `drivers.base.Resources` for `edgerund run --simulate`. The
daemon builds the REAL drivers from the config exactly as on a gateway; only the
transports differ:

- `i2c_bus(n)` for the simulated bus number (default 1) is an `AsyncI2CBus` (the real bus
  worker) over an `EmulatedSMBus` with every emulated part at its standard address:

      0x68 MPU-6050   motor housing vibration (scenario.vibration_g / angular_rate_dps)
      0x76 BME280     cabinet temperature, humidity, pressure
      0x44 SHT3x      cabinet temperature, humidity (a second, redundant sensor)
      0x40 INA219     battery pack voltage and current (0.01 ohm shunt)
      0x48 ADS1115    AIN0: motor current through a 10 A : 1 V current clamp

  Any other bus number behaves like a missing adapter (ENOENT on first use).
- `serial_port("sim://NAME")` is the real `AsyncSerialPort` opened on the pty of a
  serial emulator, started lazily on the first `open()` and stopped by `aclose()`:

      sim://gps     NMEA 0183 GPS (GGA, RMC, VTG at 1 Hz) on the scenario's track
      sim://modbus  a three-phase power meter, Modbus RTU unit 1 (SIM_MODBUS_REGISTERS)
      sim://line    a motor controller printing key=value lines at 2 Hz (SIM_LINE_FIELDS)
      sim://cobs    a battery-management board sending COBS packets at 5 Hz (SIM_COBS_FIELDS)

  Other URLs (a real `/dev/ttyUSB0`, a `socket://` test peer) are passed to real ports,
  so a simulated run can still include one real instrument.

Every emulator reads the same seeded `Scenario` on one clock, `now_s()` = seconds since
these resources were created, so the IMU, the power meter and the BME280 see one plant.
A `dropout` anomaly naming a device (`Anomaly.sensor` = "mpu6050", "bme280", "sht",
"ina219", "ads1115", "gps", "modbus", "line" or "cobs"; None = every device) takes it
off the bus: I2C parts NACK (their `online` hook), serial devices go silent (a watcher
stalls them while the dropout lasts). A `nack_storm` names an I2C part that NACKs a
`severity` fraction of its transactions (seeded, see scenario.py).

Emulators are exposed for tests (`devices`, `serial_devices`) to inject faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from drivers.base import AsyncI2CBusLike, AsyncSerialPortLike
from drivers.emulated.i2c import EmulatedDevice, EmulatedSMBus
from drivers.emulated.scenario import Scenario
from drivers.i2c.bus import AsyncI2CBus, SMBusLike
from drivers.serial.port import AsyncSerialPort, SerialPorts

__all__ = [
    "CLAMP_A_PER_V",
    "I2C_PARTS",
    "SERIAL_DEVICES",
    "SIM_COBS_FIELDS",
    "SIM_LINE_FIELDS",
    "SIM_MODBUS_REGISTERS",
    "SimResources",
]

I2C_PARTS: Mapping[str, int] = {
    "mpu6050": 0x68,
    "bme280": 0x76,
    "sht": 0x44,
    "ina219": 0x40,
    "ads1115": 0x48,
}
SERIAL_DEVICES: tuple[str, ...] = ("gps", "modbus", "line", "cobs")
CLAMP_A_PER_V = 10.0  # current clamp: 10 A per volt into ADS1115 AIN0
INA219_SHUNT_OHMS = 0.01  # battery current reaches ~14 A: 140 mV on the shunt
MAINS_V = 400.0  # line-to-line voltage the power meter measures
POWER_FACTOR = 0.85

# The power meter's register map (holding registers, FC 3), as simulate.yaml declares it.
SIM_MODBUS_UNIT = 1
SIM_MODBUS_REGISTERS: tuple[tuple[str, int, str, float, str], ...] = (
    # name, address, type, scale (raw * scale = value), unit
    ("voltage_v", 0, "float32", 1.0, "V"),
    ("current_a", 2, "float32", 1.0, "A"),
    ("power_kw", 4, "float32", 1.0, "kW"),
    ("frequency_hz", 6, "uint16", 0.01, "Hz"),
    ("energy_kwh", 8, "uint32", 0.01, "kWh"),
)
SIM_LINE_FIELDS: tuple[str, ...] = ("rpm", "load_pct", "drive_temp_c")
SIM_COBS_FIELDS: tuple[tuple[str, str, float, str], ...] = (
    # name, type, scale, unit: the packet carries scaled integers, as a small MCU would
    ("pack_v", "u16", 0.001, "V"),
    ("pack_a", "i16", 0.01, "A"),
    ("board_temp_c", "i16", 0.01, "degC"),
)


def _f(arr: Any) -> float:
    return float(np.asarray(arr).reshape(-1)[0])


_FEW = 2  # grid steps evaluated for a sparsely read signal


class GridSignal:
    """A scenario signal evaluated in vectorised blocks on a 1 kHz grid, interpolated.

    The scenario is pure numpy and vectorised: one call over 250 instants costs about as
    much as 2-3 scalar calls (~0.5 us per instant instead of 30-60 us). The emulators ask
    for one instant per conversion, from the bus worker thread, so evaluating block by
    block (`block_s` ahead) cuts the simulated plant's CPU (and its GIL hold time, which
    the event loop would feel) by more than an order of magnitude. Values between grid
    points are linearly interpolated; the scenario's noise is itself sample-and-hold on
    the same 1 kHz grid (NOISE_GRID_HZ), so grid values are exact. A block is recomputed
    when the anomaly list changes (the Scenario replaces its tuple on `add_anomaly`), so
    an injected anomaly shows from the next conversion.

    The block is kept as Python lists and interpolated in plain float arithmetic: per
    conversion that is ~1 us, where numpy's scalar indexing and arithmetic on 3-element
    rows cost ~8 us (all of it holding the GIL on the bus worker thread). 250 ms blocks
    hold the GIL for ~0.1 ms once per block (benchmarks/acquisition.py, README). A signal
    read sparsely (its previous read over a quarter block ago: the 1-10 Hz parts) gets
    only `_FEW` grid steps per evaluation instead of a block it would mostly not use.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        scenario: Scenario,
        *,
        grid_hz: float = 1000.0,
        block_s: float = 0.25,
    ) -> None:
        self._fn = fn
        self._sc = scenario
        self._dt = 1.0 / grid_hz
        self._n = max(2, round(block_s * grid_hz))
        self._steps = np.arange(self._n + 1, dtype=np.float64)
        self._few = self._steps[: _FEW + 1]
        self._last_k: int | None = None
        # (first grid index, values as lists, their count - 1, anomaly tuple it was
        # computed with): replaced as a whole, so a reader never sees a half-updated block
        self._block: tuple[int, list[Any], int, tuple[Any, ...]] | None = None

    def _at(self, t: float) -> tuple[list[Any], int, float]:
        """(block values, index of the grid point at or before t, fraction to the next)."""
        x = t / self._dt
        k = math.floor(x)
        blk = self._block
        anomalies = self._sc.anomalies
        if blk is None or not 0 <= k - blk[0] < blk[2] or blk[3] is not anomalies:
            # A sensor read less than four times a block (the 1-10 Hz parts) would use
            # a few values of a whole block: it gets a few grid points, as cheap as one.
            last = self._last_k
            steps = self._steps if last is not None and k - last < self._n // 4 else self._few
            vals = np.asarray(self._fn((k + steps) * self._dt), dtype=np.float64)
            blk = (k, vals.tolist(), len(steps) - 1, anomalies)
            self._block = blk
        self._last_k = k
        return blk[1], k - blk[0], x - k

    def scalar(self) -> Callable[[float], float]:
        def f(t: float) -> float:
            v, i, frac = self._at(t)
            a = v[i]
            return float(a + (v[i + 1] - a) * frac)

        return f

    def vec3(self) -> Callable[[float], tuple[float, float, float]]:
        def f(t: float) -> tuple[float, float, float]:
            v, i, frac = self._at(t)
            (ax, ay, az), (bx, by, bz) = v[i], v[i + 1]
            return ax + (bx - ax) * frac, ay + (by - ay) * frac, az + (bz - az) * frac

        return f


class _MissingBus:
    """What opening a nonexistent /dev/i2c-N gives: ENOENT."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self) -> SMBusLike:
        raise OSError(errno.ENOENT, f"no such I2C adapter /dev/i2c-{self.n} (simulated)")


class _SimPort:
    """The real AsyncSerialPort on an emulator's pty; starts the emulator on open()."""

    def __init__(self, url: str, inner: AsyncSerialPort, ensure: Callable[[], Any]) -> None:
        self.url = url
        self._inner = inner
        self._ensure = ensure

    async def open(self) -> None:
        await self._ensure()
        await self._inner.open()

    async def reopen(self) -> None:
        await self._ensure()
        await self._inner.reopen()

    def __getattr__(self, name: str) -> Any:  # everything else is the real port's
        return getattr(self._inner, name)

    async def close(self) -> None:
        await self._inner.close()

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)

    async def read_some(self, max_bytes: int = 4096) -> bytes:
        return await self._inner.read_some(max_bytes)


class SimResources:
    """`Resources` for simulated mode (see the module docstring)."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        i2c_bus: int = 1,
        workdir: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        scl_hz: float | None = None,
    ) -> None:
        self.scenario = scenario
        self.sim_bus = i2c_bus
        self._clock = clock
        self._t0 = clock()
        self._scl_hz = scl_hz
        self._workdir_arg = workdir
        self._workdir: Path | None = None
        self._own_workdir = False
        self._buses: dict[int, AsyncI2CBus] = {}
        self.smbus: EmulatedSMBus | None = None
        self.devices: dict[str, EmulatedDevice] = {}
        self.serial_devices: dict[str, Any] = {}
        self._start_locks: dict[str, asyncio.Lock] = {}
        self._ports = SerialPorts()
        self._sim_ports: dict[str, _SimPort] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._energy_kwh = 0.0
        self._energy_t = 0.0

    # -- the shared clock ---------------------------------------------------------------
    def now_s(self) -> float:
        """Scenario time: seconds since these resources were created."""
        return self._clock() - self._t0

    def online(self, name: str) -> Callable[[float], bool]:
        scenario = self.scenario

        def online(t: float) -> bool:
            if not scenario.anomalies:  # per transaction: the common case costs nothing
                return True
            return not (scenario.is_dropout(name, t) or scenario.is_nacked(name, t))

        return online

    def device_for(self, cfg: Any) -> str:
        """The emulated device a sensor config talks to (for dropout anomalies)."""
        port = getattr(cfg, "port", None)
        if isinstance(port, str) and port.startswith("sim://"):
            return port[len("sim://") :]
        return str(getattr(cfg.__struct_config__, "tag", "") or "")

    # -- I2C ----------------------------------------------------------------------------
    def _build_i2c(self) -> EmulatedSMBus:
        sc = self.scenario
        now = self.now_s
        smbus = EmulatedSMBus(scl_hz=self._scl_hz)
        for name, builder in _I2C_BUILDERS.items():
            dev = builder(self, sc, now, self.online(name))
            if dev is not None:
                smbus.attach(dev)
                self.devices[name] = dev
        return smbus

    def i2c_bus(self, bus: int) -> AsyncI2CBusLike:
        b = self._buses.get(bus)
        if b is None:
            if bus == self.sim_bus:
                self.smbus = self._build_i2c()
                b = AsyncI2CBus.from_smbus(self.smbus, f"sim-{bus}")
            else:
                b = AsyncI2CBus(_MissingBus(bus), f"sim-{bus}")
            self._buses[bus] = b
        return b

    # -- serial -------------------------------------------------------------------------
    def _link(self, name: str) -> Path:
        if self._workdir is None:
            if self._workdir_arg is not None:
                self._workdir = Path(self._workdir_arg)
                self._workdir.mkdir(parents=True, exist_ok=True)
            else:
                self._workdir = Path(tempfile.mkdtemp(prefix="edgerund-sim-"))
                self._own_workdir = True
        return self._workdir / f"tty-{name}"

    def serial_port(self, url: str, **settings: Any) -> AsyncSerialPortLike:
        if not url.startswith("sim://"):
            return self._ports.get(url, **settings)
        name = url[len("sim://") :]
        if name not in SERIAL_DEVICES:
            raise ValueError(
                f"unknown simulated port {url!r}; expected one of "
                f"{', '.join('sim://' + n for n in SERIAL_DEVICES)}"
            )
        port = self._sim_ports.get(url)
        if port is None:
            inner = self._ports.get(str(self._link(name)), **settings)

            async def ensure(name: str = name) -> None:
                await self._ensure_serial(name)

            port = _SimPort(url, inner, ensure)
            self._sim_ports[url] = port
        return port

    async def _ensure_serial(self, name: str) -> None:
        lock = self._start_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.serial_devices:
                return
            dev = _SERIAL_BUILDERS[name](self, self._link(name))
            await dev.start()
            self.serial_devices[name] = dev
            if self._watcher is None:
                self._watcher = asyncio.create_task(self._watch_dropouts(), name="sim-dropouts")

    async def _watch_dropouts(self) -> None:
        """Serial devices go silent while a dropout names them (or names no device)."""
        while True:
            t = self.now_s()
            for name, dev in list(self.serial_devices.items()):
                out = self.scenario.is_dropout(name, t)
                if out and not dev.stalled:
                    dev.stall()
                elif not out and dev.stalled and getattr(dev, "_sim_dropout", False):
                    dev.unstall()
                dev._sim_dropout = out
            await asyncio.sleep(0.05)

    # -- life cycle ---------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self._ports.close_all()
        for dev in self.serial_devices.values():
            with contextlib.suppress(Exception):
                await dev.stop()
        self.serial_devices.clear()
        for b in self._buses.values():
            with contextlib.suppress(Exception):
                await b.close()
        self._buses.clear()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # -- signals for the power meter ---------------------------------------------------
    def _meter_update(self, _t: float, unit: Any) -> None:
        t = self.now_s()
        sc = self.scenario
        amps = _f(sc.motor_current_a(t))
        load = _f(sc.motor_load(t))
        volts = MAINS_V * (1.0 + 0.004 * math.sin(2 * math.pi * t / 97.0)) + 0.5 * (load - 0.7)
        kw = math.sqrt(3.0) * volts * amps * POWER_FACTOR / 1000.0
        if self._energy_t == 0.0:
            self._energy_t = t
        self._energy_kwh += kw * max(0.0, t - self._energy_t) / 3600.0
        self._energy_t = t
        values = {
            "voltage_v": volts,
            "current_a": amps,
            "power_kw": kw,
            "frequency_hz": 50.0 + 0.02 * math.sin(2 * math.pi * t / 31.0),
            "energy_kwh": 1234.5 + self._energy_kwh,
        }
        for name, addr, typ, scale, _unit in SIM_MODBUS_REGISTERS:
            raw = values[name] / scale
            unit.set(addr, round(raw) if typ != "float32" else raw, typ)


# -- builders: one per emulated part ------------------------------------------------------
# Each takes (resources, scenario, clock, online) and returns the attached device; the
# imports are local so a part whose emulator is missing does not break the others.

Builder = Callable[
    [SimResources, Scenario, Callable[[], float], Callable[[float], bool]], EmulatedDevice | None
]


def _bme280(
    r: SimResources, sc: Scenario, now: Callable[[], float], online: Callable[[float], bool]
) -> EmulatedDevice:
    from drivers.emulated.bme280 import EmulatedBME280

    return EmulatedBME280(
        I2C_PARTS["bme280"],
        temperature_c=GridSignal(sc.cabinet_temp_c, sc).scalar(),
        pressure_pa=GridSignal(sc.pressure_pa, sc).scalar(),
        humidity_pct=GridSignal(sc.humidity_pct, sc).scalar(),
        clock=now,
        online=online,
    )


def _sht(
    r: SimResources, sc: Scenario, now: Callable[[], float], online: Callable[[float], bool]
) -> EmulatedDevice:
    from drivers.emulated.sht import EmulatedSHT

    return EmulatedSHT(
        "sht3x",
        I2C_PARTS["sht"],
        temperature_c=GridSignal(sc.cabinet_temp_c, sc).scalar(),
        humidity_pct=GridSignal(sc.humidity_pct, sc).scalar(),
        clock=now,
        online=online,
    )


def _ads1115(
    r: SimResources, sc: Scenario, now: Callable[[], float], online: Callable[[float], bool]
) -> EmulatedDevice:
    from drivers.emulated.ads1115 import EmulatedADS1115

    return EmulatedADS1115(
        I2C_PARTS["ads1115"],
        ain0_v=GridSignal(lambda t: sc.motor_current_a(t) / CLAMP_A_PER_V, sc).scalar(),
        clock=now,
        online=online,
    )


def _mpu6050(
    r: SimResources, sc: Scenario, now: Callable[[], float], online: Callable[[float], bool]
) -> EmulatedDevice | None:
    try:
        from drivers.emulated.mpu6050 import EmulatedMPU6050
    except ModuleNotFoundError:
        return None

    dev: EmulatedDevice = EmulatedMPU6050(
        I2C_PARTS["mpu6050"],
        accel_g=GridSignal(sc.vibration_g, sc).vec3(),
        gyro_dps=GridSignal(sc.angular_rate_dps, sc).vec3(),
        # the part sits on the motor housing: a few degrees above the cabinet air
        temperature_c=GridSignal(lambda t: sc.cabinet_temp_c(t) + 5.0, sc).scalar(),
        clock=now,
        online=online,
    )
    return dev


def _ina219(
    r: SimResources, sc: Scenario, now: Callable[[], float], online: Callable[[float], bool]
) -> EmulatedDevice | None:
    try:
        from drivers.emulated.ina219 import EmulatedINA219
    except ModuleNotFoundError:
        return None
    dev: EmulatedDevice = EmulatedINA219(
        I2C_PARTS["ina219"],
        bus_voltage_v=GridSignal(sc.battery_v, sc).scalar(),
        current_a=GridSignal(sc.battery_a, sc).scalar(),
        shunt_ohms=INA219_SHUNT_OHMS,
        clock=now,
        online=online,
    )
    return dev


_I2C_BUILDERS: dict[str, Builder] = {
    "mpu6050": _mpu6050,
    "bme280": _bme280,
    "sht": _sht,
    "ina219": _ina219,
    "ads1115": _ads1115,
}


def _gps(r: SimResources, link: Path) -> Any:
    from drivers.emulated.nmea_gps import NmeaGpsEmulator

    return NmeaGpsEmulator(
        link, fix=lambda _t: r.scenario.gps(r.now_s()), rate_hz=1.0, seed=r.scenario.seed
    )


def _modbus(r: SimResources, link: Path) -> Any:
    from drivers.emulated.modbus_slave import ModbusSlaveEmulator, ModbusUnit

    # A real meter answers for the reserved registers between the documented ones too
    # (reading through small gaps is what the master does to save requests).
    unit = ModbusUnit(holding=dict.fromkeys(range(16), 0), update=r._meter_update)
    r._meter_update(0.0, unit)
    return ModbusSlaveEmulator(link, units={SIM_MODBUS_UNIT: unit}, seed=r.scenario.seed)


def _line(r: SimResources, link: Path) -> Any:
    from drivers.emulated.line_instrument import LineInstrumentEmulator

    def values(_t: float) -> dict[str, float]:
        t = r.now_s()
        sc = r.scenario
        return {
            "rpm": _f(sc.shaft_hz(t)) * 60.0,
            "load_pct": _f(sc.motor_load(t)) * 100.0,
            "drive_temp_c": _f(sc.cabinet_temp_c(t)) + 12.0 * _f(sc.motor_load(t)),
        }

    return LineInstrumentEmulator(
        link,
        values=values,
        fields=SIM_LINE_FIELDS,
        format="kv",
        rate_hz=2.0,
        decimals=2,
        seed=r.scenario.seed,
    )


def _cobs(r: SimResources, link: Path) -> Any:
    from drivers.emulated.cobs_device import CobsDeviceEmulator
    from drivers.serial.cobs import CobsField

    fields = [
        CobsField(name=n, type=typ, scale=scale, unit=u)  # type: ignore[arg-type]
        for n, typ, scale, u in SIM_COBS_FIELDS
    ]

    def values(_t: float) -> list[float]:
        t = r.now_s()
        sc = r.scenario
        phys = (_f(sc.battery_v(t)), _f(sc.battery_a(t)), _f(sc.cabinet_temp_c(t)) + 3.0)
        # the packet carries raw integers: physical value / scale (the driver multiplies)
        return [v / f[2] for v, f in zip(phys, SIM_COBS_FIELDS, strict=True)]

    return CobsDeviceEmulator(link, fields=fields, values=values, rate_hz=5.0, seed=r.scenario.seed)


_SERIAL_BUILDERS: dict[str, Callable[[SimResources, Path], Any]] = {
    "gps": _gps,
    "modbus": _modbus,
    "line": _line,
    "cobs": _cobs,
}
