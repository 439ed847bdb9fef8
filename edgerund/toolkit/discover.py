"""`edgerund discover` / `edgerunctl discover`: find what is wired, print a config fragment.

Theory of operation
-------------------
Bring-up of a new gateway starts from what is on the wires. Discover looks, read-only,
where the parts we drive live, identifies them where the part allows it, and prints a
commented YAML `sensors:` fragment that `edgerund check-config` accepts, with what it
could not identify (and the outputs it found: GPIO chips, PWM chips, PCA9685s) as
comments. It never writes a register or a setting to a device:

- I2C (`/dev/i2c-N`): i2cdetect's read-only probe (drivers/i2c/scan.py: quick write or
  receive byte), then, per responding address, register *reads* that identify a part:
  BME280 chip id 0x60 at 0xD0 (0x76/0x77); MPU-6050 WHO_AM_I 0x68 at 0x75 (0x68/0x69);
  ADS1115 comparator thresholds at their power-on values 0x8000 / 0x7FFF (0x48..0x4B; the
  driver never changes them); INA219 configuration register at its power-on 0x399F and
  calibration 0 (0x40..0x4F; a part configured since power-on is listed as a likely
  INA219, unconfirmed); PCA9685 MODE1 with ALLCALL set, MODE2's reserved bits clear, a
  legal PRE_SCALE, and two bytes read from 0x00 behaving as an 8-bit register map
  (0x40..0x7F). A register read is a pointer write then a read, which changes no
  device state. Only on 0x44..0x46, and only after the reads above found no other part,
  is the Sensirion serial-number command sent (SHT4x 0x89, SHT3x 0x3780): the reply's
  CRC-8 per word is the identification, and that command changes nothing on the sensor.
  A PCA9685 could sit at 0x44 too, which is why the read checks come first.
- Serial ports: listened to (never written) for NMEA 0183 at 9600, 4800, 38400 and 115200
  baud; one sentence with a valid checksum identifies a GPS and its baud rate. A pty or a
  USB CDC-ACM receiver delivers at any baud, so the first rate that hears NMEA is given.
- Modbus RTU, only on a port the user names (`--modbus PORT`): reading holding register
  0 (FC 3, then input register 0 with FC 4) of each unit id in `--modbus-units`; an
  answer, or an exception response (the unit exists but has no register 0), is a unit.
  Reads only: a read request changes nothing on a slave.
- 1-Wire: the temperature probes the kernel's w1 master enumerated (drivers/w1.py).
- GPIO chips (`/dev/gpiochip*`, their label and line count when the `gpiod` binding is
  there) and PWM chips (`/sys/class/pwm/pwmchip*`, `npwm`): listed as comments with an
  example entry, since which line a contact or a fan is wired to cannot be seen.

While the daemon runs it holds the buses and ports it uses: `edgerunctl discover` first
asks it (`sensors` over the socket) which I2C addresses and serial ports are in use, does
not touch them (they are listed as already configured), and probes the rest directly
(i2c-dev serialises transactions with the daemon's in the kernel; a serial port the
daemon has open is locked). `edgerund discover` probes everything, for a daemon that
is not running. The probing core takes its transports as arguments, so the tests run it
against the I2C emulators, ptys and sysfs-shaped trees.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import glob
import importlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drivers.errors import DeviceError, FrameError
from drivers.i2c import ads1115, bme280, ina219, mpu6050, pca9685, sht
from drivers.i2c.bus import SMBusLike
from drivers.i2c.scan import KNOWN_PARTS, scan
from drivers.serial.modbus import ModbusException, ModbusMaster
from drivers.serial.nmea import parse_sentence
from drivers.serial.port import AsyncSerialPort
from drivers.w1 import THERM_FAMILIES, W1_ROOT, list_probes

__all__ = [
    "Finding",
    "Options",
    "discover",
    "identify_i2c",
    "in_use_from_sensors",
    "render_yaml",
]

NMEA_BAUDS = (9600, 4800, 38400, 115200)
SERIAL_GLOBS = ("serial0", "ttyAMA*", "ttyS0", "ttyTHS*", "ttyUSB*", "ttyACM*")


@dataclass
class Finding:
    """One thing found: a sensor entry (`entry`) or a comment only."""

    where: str  # "i2c-1 0x76", "/dev/ttyUSB0", "w1 28-..."
    what: str  # human description: "BME280 (chip id 0x60 at 0xD0)"
    entry: dict[str, Any] | None = None  # a `sensors:` entry, None: comment only
    section: str = "sensors"  # sensors | outputs | unidentified | configured


@dataclass
class Options:
    i2c_buses: list[int] | None = None  # None: every /dev/i2c-N
    serial_ports: list[str] | None = None  # None: the usual UART / USB names under dev_root
    modbus_port: str | None = None
    modbus_baud: int = 9600
    modbus_units: Sequence[int] = tuple(range(1, 17))
    modbus_timeout_s: float = 0.1
    listen_s: float = 2.5  # per baud rate: NMEA receivers talk at least once a second
    nmea_bauds: Sequence[int] = NMEA_BAUDS
    dev_root: str = "/dev"
    w1_root: str = W1_ROOT
    pwm_root: str = "/sys/class/pwm"
    in_use_i2c: dict[tuple[int, int], str] = field(default_factory=dict)  # -> sensor id
    in_use_ports: dict[str, str] = field(default_factory=dict)  # path -> sensor id


# -- I2C: read-only identification (pure over an smbus-like object) --------------------------


def _word(bus: SMBusLike, addr: int, reg: int) -> int:
    b = bus.read_i2c_block_data(addr, reg, 2)
    return (b[0] << 8) | b[1]


def _byte(bus: SMBusLike, addr: int, reg: int) -> int:
    return bus.read_byte_data(addr, reg)


def _sensirion_serial(bus: SMBusLike, addr: int, cmd: bytes) -> int | None:
    """Send a Sensirion serial-number command, read 2 words + CRCs; None if no valid reply."""
    from smbus2 import i2c_msg

    try:
        bus.i2c_rdwr(i2c_msg.write(addr, cmd))
        time.sleep(0.002)
        msg = i2c_msg.read(addr, 6)
        bus.i2c_rdwr(msg)
        words = sht.parse_words(bytes(msg))
    except (OSError, FrameError):
        return None
    return (words[0] << 16) | words[1]


def identify_i2c(bus: SMBusLike, addr: int) -> tuple[str, str] | None:
    """-> (driver or part name, how it was identified), or None. Reads only (see top)."""

    def attempt(fn: Callable[[], tuple[str, str] | None]) -> tuple[str, str] | None:
        try:
            return fn()
        except OSError:
            return None

    def bme() -> tuple[str, str] | None:
        cid = _byte(bus, addr, bme280.REG_CHIP_ID)
        if cid == bme280.CHIP_ID:
            return "bme280", "BME280, chip id 0x60 at 0xD0"
        other = bme280.OTHER_CHIPS.get(cid)
        return (
            (f"?{other}", f"{other}, chip id 0x{cid:02x} at 0xD0 (not driven)") if other else None
        )

    def mpu() -> tuple[str, str] | None:
        who = _byte(bus, addr, mpu6050.REG_WHO_AM_I)
        if who == mpu6050.WHO_AM_I:
            return "mpu6050", "MPU-6050, WHO_AM_I 0x68 at 0x75"
        other = mpu6050.OTHER_CHIPS.get(who)
        return (f"?{other}", f"{other}, WHO_AM_I 0x{who:02x} (not driven)") if other else None

    def ads() -> tuple[str, str] | None:
        lo = _word(bus, addr, ads1115.REG_LO_THRESH)
        hi = _word(bus, addr, ads1115.REG_HI_THRESH)
        if (lo, hi) == (0x8000, 0x7FFF):
            return "ads1115", "ADS1115, comparator thresholds at power-on 0x8000/0x7FFF"
        return None

    def ina() -> tuple[str, str] | None:
        cfg = _word(bus, addr, ina219.REG_CONFIG)
        cal = _word(bus, addr, ina219.REG_CALIBRATION)
        if cfg == ina219.CONFIG_DEFAULT and cal == 0:
            return "ina219", "INA219, configuration 0x399F and calibration 0 (power-on)"
        return None

    def pca() -> tuple[str, str] | None:
        mode1 = _byte(bus, addr, pca9685.REG_MODE1)
        pre = _byte(bus, addr, pca9685.REG_PRE_SCALE)
        mode2 = _byte(bus, addr, pca9685.REG_MODE2)
        # an 8-bit register map: two bytes from 0x00 are MODE1 then MODE2 with
        # auto-increment on, MODE1 twice without (a 16-bit part returns one word)
        pair = bus.read_i2c_block_data(addr, pca9685.REG_MODE1, 2)
        second = mode2 if mode1 & pca9685.MODE1_AI else mode1
        if pair != [mode1, second]:
            return None
        if mode1 & pca9685.MODE1_ALLCALL and not mode2 & 0xE0 and pre >= pca9685.PRESCALE_MIN:
            f = pca9685.frequency_for(pre)
            return "pca9685", f"PCA9685, MODE1 0x{mode1:02x}, PRE_SCALE {pre} ({f:.0f} Hz)"
        return None

    def sensirion() -> tuple[str, str] | None:
        s4 = _sensirion_serial(bus, addr, bytes([sht.SHT4X_READ_SERIAL]))
        if s4 is not None:
            return "sht:sht4x", f"SHT4x, serial number 0x{s4:08x} (CRC valid)"
        s3 = _sensirion_serial(bus, addr, sht.SHT3X_READ_SERIAL.to_bytes(2, "big"))
        if s3 is not None:
            return "sht:sht3x", f"SHT3x, serial number 0x{s3:08x} (CRC valid)"
        return None

    checks: list[Callable[[], tuple[str, str] | None]] = []
    if addr in (0x76, 0x77):
        checks.append(bme)
    if addr in (0x68, 0x69):
        checks.append(mpu)
    if addr in ads1115.ADDRESSES:
        checks.append(ads)
    if addr in ina219.ADDRESSES:
        checks.append(ina)
    if 0x40 <= addr <= 0x7F and addr != 0x70:
        checks.append(pca)
    if addr in (0x44, 0x45, 0x46):
        checks.append(sensirion)  # last: it is a command, not a register read
    for check in checks:
        got = attempt(check)
        if got is not None:
            return got
    if addr in ina219.ADDRESSES:
        with contextlib.suppress(OSError):
            cfg = _word(bus, addr, ina219.REG_CONFIG)
            if cfg & 0x4000 == 0 and cfg & 0x7 != 0:  # bit 14 reads 0; a mode set
                return "?ina219", f"likely INA219 (configuration 0x{cfg:04x}, not power-on)"
    return None


def discover_i2c(bus_no: int, bus: SMBusLike, in_use: dict[tuple[int, int], str]) -> list[Finding]:
    """Probe one bus (blocking: run in a thread) and identify what answers."""
    skip = {a for (b, a) in in_use if b == bus_no}
    found: list[Finding] = []
    for addr, status in scan(bus, in_use=skip).items():
        where = f"i2c-{bus_no} 0x{addr:02x}"
        if status == "absent":
            continue
        if status == "in_use":
            found.append(
                Finding(
                    where, f"configured as sensor {in_use[(bus_no, addr)]!r}", None, "configured"
                )
            )
            continue
        if status == "busy":
            found.append(Finding(where, "owned by a kernel driver (UU)", None, "unidentified"))
            continue
        got = identify_i2c(bus, addr)
        if got is None:
            hint = KNOWN_PARTS.get(addr)
            found.append(
                Finding(
                    where,
                    f"responds, not identified{f' ({hint}?)' if hint else ''}",
                    None,
                    "unidentified",
                )
            )
            continue
        name, how = got
        if name.startswith("?"):
            found.append(Finding(where, how, None, "unidentified"))
        elif name == "pca9685":
            found.append(Finding(where, how, _pca_example(bus_no, addr), "outputs"))
        else:
            driver, _, part = name.partition(":")
            entry: dict[str, Any] = {
                "id": f"{driver}_{bus_no}_{addr:02x}",
                "driver": driver,
                "bus": bus_no,
                "address": addr,
            }
            if part:
                entry["part"] = part
            found.append(Finding(where, how, entry))
    return found


def _pca_example(bus_no: int, addr: int) -> dict[str, Any]:
    return {"driver": "pca9685", "bus": bus_no, "address": addr, "channel": 0, "frequency_hz": 1000}


# -- serial: NMEA by listening, Modbus by reading ----------------------------------------------


async def listen_nmea(path: str, bauds: Sequence[int], listen_s: float) -> tuple[int, str] | None:
    """-> (baud, sentence types heard) if NMEA with valid checksums arrives. Never writes."""
    for baud in bauds:
        port = AsyncSerialPort(path, baudrate=baud)
        try:
            await port.open()
        except DeviceError:
            return None
        buf = b""
        kinds: set[str] = set()
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + listen_s
            while not kinds and loop.time() < end:
                try:
                    async with asyncio.timeout(max(0.0, end - loop.time())):
                        buf += await port.read_some()
                except TimeoutError:
                    break
                except DeviceError:
                    return None
                *lines, buf = buf.split(b"\n")
                buf = buf[-512:]
                for line in lines:
                    with contextlib.suppress(FrameError):
                        s = parse_sentence(line)
                        kinds.add(s.type if s is not None else "other")
        finally:
            await port.close()
        if kinds:
            return baud, ", ".join(sorted(kinds))
    return None


async def probe_modbus(
    path: str, baud: int, units: Iterable[int], timeout_s: float
) -> list[Finding]:
    port = AsyncSerialPort(path, baudrate=baud)
    await port.open()
    master = ModbusMaster(port, timeout_s=timeout_s)
    found: list[Finding] = []
    try:
        for unit in units:
            answer: tuple[int, str] | None = None
            for fc in (3, 4):
                try:
                    await master.read_registers(unit, fc, 0, 1)
                    answer = (fc, f"register 0 readable with function {fc}")
                    break
                except ModbusException as exc:
                    answer = answer or (0, f"answers with an exception ({exc})")
                except (DeviceError, FrameError):
                    break  # silent (or garbled): no unit, do not ask again
            if answer is None:
                continue
            where = f"{path} unit {unit}"
            fc, how = answer
            if fc:
                entry = {
                    "id": f"modbus_{unit}",
                    "driver": "modbus",
                    "port": path,
                    "baudrate": baud,
                    "unit": unit,
                    "registers": [{"name": "reg0", "address": 0, "function": fc}],
                }
                found.append(Finding(where, f"Modbus unit {unit}, {how}", entry))
            else:
                found.append(Finding(where, f"Modbus unit {unit} {how}", None, "unidentified"))
    finally:
        await port.close()
    return found


# -- sysfs / dev nodes ---------------------------------------------------------------------------


def find_w1(root: str) -> list[Finding]:
    out = []
    for rom in list_probes(root):
        entry = {"id": f"temp_{rom[-6:]}", "driver": "ds18b20", "device": rom}
        if root != W1_ROOT:
            entry["sysfs_root"] = root
        out.append(Finding(f"w1 {rom}", f"{THERM_FAMILIES[rom[:2]]} temperature probe", entry))
    return out


def find_gpio(dev_root: str) -> list[Finding]:
    out = []
    for path in sorted(glob.glob(os.path.join(dev_root, "gpiochip*"))):
        name = os.path.basename(path)
        info = "label and lines unknown (no gpiod binding)"
        with contextlib.suppress(Exception):
            gpiod = importlib.import_module("gpiod")
            with gpiod.Chip(path) as chip:
                ci = chip.get_info()
                info = f"{ci.label}, {ci.num_lines} lines"
                if ci.label == "pinctrl-rp1":
                    info += " (the Pi 5 40-pin header)"
        out.append(
            Finding(
                name,
                f"GPIO chip: {info}",
                {"driver": "gpio_input", "chip": name, "line": 17},
                "outputs",
            )
        )
    return out


def find_pwm(root: str) -> list[Finding]:
    out = []
    for path in sorted(glob.glob(os.path.join(root, "pwmchip*"))):
        name = os.path.basename(path)
        npwm = "?"
        with contextlib.suppress(OSError), open(os.path.join(path, "npwm")) as f:
            npwm = f.read().strip()
        chip = int(name.removeprefix("pwmchip"))
        ex: dict[str, Any] = {
            "driver": "pwm_sysfs",
            "chip": chip,
            "channel": 0,
            "frequency_hz": 1000,
        }
        if root != "/sys/class/pwm":
            ex["sysfs_root"] = root
        out.append(Finding(name, f"PWM chip, {npwm} channels", ex, "outputs"))
    return out


def serial_candidates(dev_root: str) -> list[str]:
    out: list[str] = []
    for pattern in SERIAL_GLOBS:
        for p in sorted(glob.glob(os.path.join(dev_root, pattern))):
            real = os.path.realpath(p)
            if real not in {os.path.realpath(x) for x in out}:
                out.append(p)
    return out


def i2c_buses(dev_root: str) -> list[int]:
    out = []
    for p in glob.glob(os.path.join(dev_root, "i2c-*")):
        with contextlib.suppress(ValueError):
            out.append(int(p.rsplit("-", 1)[1]))
    return sorted(out)


# -- orchestration ---------------------------------------------------------------------------------


def _open_smbus(n: int) -> SMBusLike:
    from smbus2 import SMBus

    bus: SMBusLike = SMBus(n)
    return bus


async def discover(
    opts: Options, open_i2c: Callable[[int], SMBusLike] = _open_smbus
) -> list[Finding]:
    found: list[Finding] = []
    buses = opts.i2c_buses if opts.i2c_buses is not None else i2c_buses(opts.dev_root)
    for n in buses:
        try:
            bus = await asyncio.to_thread(open_i2c, n)
        except OSError as exc:
            found.append(
                Finding(f"i2c-{n}", f"cannot open: {exc.strerror or exc}", None, "unidentified")
            )
            continue
        try:
            found += await asyncio.to_thread(discover_i2c, n, bus, opts.in_use_i2c)
        except OSError as exc:
            found.append(
                Finding(f"i2c-{n}", f"scan failed: {exc.strerror or exc}", None, "unidentified")
            )
        finally:
            await asyncio.to_thread(bus.close)
    ports = opts.serial_ports
    if ports is None:
        ports = await asyncio.to_thread(serial_candidates, opts.dev_root)
    for path in ports:
        if path == opts.modbus_port:
            continue
        real = await asyncio.to_thread(os.path.realpath, path)
        owner = opts.in_use_ports.get(path) or opts.in_use_ports.get(real)
        if owner:
            found.append(Finding(path, f"configured as sensor {owner!r}", None, "configured"))
            continue
        heard = await listen_nmea(path, opts.nmea_bauds, opts.listen_s)
        if heard is None:
            found.append(
                Finding(
                    path,
                    f"no NMEA heard at {'/'.join(map(str, opts.nmea_bauds))} baud "
                    "(a Modbus line? try --modbus PORT)",
                    None,
                    "unidentified",
                )
            )
            continue
        baud, kinds = heard
        entry = {
            "id": f"gps_{os.path.basename(path)}",
            "driver": "nmea",
            "port": path,
            "baudrate": baud,
        }
        found.append(Finding(path, f"NMEA 0183 at {baud} baud ({kinds})", entry))
    if opts.modbus_port:
        try:
            found += await probe_modbus(
                opts.modbus_port, opts.modbus_baud, opts.modbus_units, opts.modbus_timeout_s
            )
        except DeviceError as exc:
            found.append(Finding(opts.modbus_port, str(exc), None, "unidentified"))
    found += await asyncio.to_thread(find_w1, opts.w1_root)
    found += await asyncio.to_thread(find_gpio, opts.dev_root)
    found += await asyncio.to_thread(find_pwm, opts.pwm_root)
    return found


_WHERE_I2C = re.compile(r"^i2c-(\d+)@0x([0-9a-fA-F]{2})")


def in_use_from_sensors(
    sensors: Iterable[dict[str, Any]],
) -> tuple[dict[tuple[int, int], str], dict[str, str]]:
    """The daemon's `sensors` answer -> (I2C (bus, addr) in use, serial ports in use)."""
    i2c: dict[tuple[int, int], str] = {}
    ports: dict[str, str] = {}
    for s in sensors:
        where = str(s.get("where") or "")
        m = _WHERE_I2C.match(where)
        if m:
            i2c[(int(m.group(1)), int(m.group(2), 16))] = str(s.get("id"))
        elif where.startswith("/"):
            ports[where.split()[0]] = str(s.get("id"))
    return i2c, ports


# -- output ------------------------------------------------------------------------------------------


_BARE = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n"}


def _scalar(v: Any, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int) and key == "address":
        return f"0x{v:02x}"
    if isinstance(v, (int, float)):
        return str(v)
    text = str(v)
    if _BARE.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def _entry_lines(entry: dict[str, Any], indent: str, comment: bool = False) -> list[str]:
    lines = []
    first = True
    c = "# " if comment else ""
    for k, v in entry.items():
        lead = f"{indent}{c}- " if first else f"{indent}{c}  "
        first = False
        if isinstance(v, list):
            lines.append(f"{lead}{k}:")
            for item in v:
                body = ", ".join(f"{a}: {_scalar(b, '')}" for a, b in item.items())
                lines.append(f"{indent}{c}    - {{{body}}}")
        else:
            lines.append(f"{lead}{k}: {_scalar(v, k)}")
    return lines


def render_yaml(found: Sequence[Finding], now: datetime.datetime | None = None) -> str:
    """A commented `sensors:` fragment; everything else as comments after it."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = [
        f"# edgerund discover, {stamp}: read-only probe. Paste under the config's",
        "# top level (or merge into its sensors:), then rename ids and set rates.",
    ]
    sensors = [f for f in found if f.section == "sensors" and f.entry]
    if sensors:
        out.append("sensors:")
        for f in sensors:
            assert f.entry is not None
            out.append(f"  # {f.where}: {f.what}")
            out.extend(_entry_lines(f.entry, "  "))
    else:
        out.append("sensors: []  # nothing identified")
    outputs = [f for f in found if f.section == "outputs"]
    if outputs:
        out += ["", "# Outputs and GPIO found (use under loops[].actuator, or as a gpio_input"]
        out.append("# sensor once you know the line):")
        for f in outputs:
            out.append(f"#   {f.where}: {f.what}")
            if f.entry:
                out.extend(_entry_lines(f.entry, "#     ", comment=False))
    for section, title in (
        ("configured", "Already configured (not probed):"),
        ("unidentified", "Not identified:"),
    ):
        rows = [f for f in found if f.section == section]
        if rows:
            out += ["", f"# {title}"]
            out += [f"#   {f.where}: {f.what}" for f in rows]
    return "\n".join(out) + "\n"


# -- command line (shared by `edgerund discover` and `edgerunctl discover`) ---------------------


def _units(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if not 1 <= a <= b <= 247:
            raise ValueError(f"unit ids are 1..247, got {part!r}")
        out.extend(range(a, b + 1))
    return out


def add_arguments(p: Any) -> None:
    p.add_argument("--i2c-bus", type=int, action="append", help="only this bus (repeatable)")
    p.add_argument(
        "--serial", action="append", help="listen for NMEA on this port only (repeatable)"
    )
    p.add_argument("--modbus", metavar="PORT", help="probe Modbus RTU unit ids on this port")
    p.add_argument("--modbus-baud", type=int, default=9600, help="default 9600")
    p.add_argument(
        "--modbus-units",
        type=_units,
        default=list(range(1, 17)),
        help="e.g. 1-16,100 (default 1-16)",
    )
    p.add_argument("--listen-s", type=float, default=2.5, help="NMEA listen time per baud rate")
    p.add_argument("--dev-root", default="/dev", help=argparse_suppress())
    p.add_argument("--w1-root", default=W1_ROOT, help=argparse_suppress())
    p.add_argument("--pwm-root", default="/sys/class/pwm", help=argparse_suppress())


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


def options_from_args(args: Any) -> Options:
    return Options(
        i2c_buses=args.i2c_bus,
        serial_ports=args.serial,
        modbus_port=args.modbus,
        modbus_baud=args.modbus_baud,
        modbus_units=args.modbus_units,
        listen_s=args.listen_s,
        dev_root=args.dev_root,
        w1_root=args.w1_root,
        pwm_root=args.pwm_root,
    )


def run(opts: Options) -> int:
    """Probe and print the fragment. Exit 0 (something identified) or 1 (nothing)."""
    found = asyncio.run(discover(opts))
    print(render_yaml(found), end="")
    return 0 if any(f.entry and f.section == "sensors" for f in found) else 1
