"""NMEA 0183: published sentences (golden), the GPS emulator on a pty, faults."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from drivers.base import Quality
from drivers.emulated.nmea_gps import NmeaGpsEmulator, format_gga, format_rmc, format_vtg
from drivers.emulated.scenario import Scenario
from drivers.errors import DeviceError, FrameError
from drivers.serial.nmea import NmeaConfig, NmeaSensor, checksum, parse_sentence

# Published examples (NMEA 0183 reference texts, e.g. gpsinformation.org / Trimble docs)
GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"
VTG = b"$GPVTG,054.7,T,034.4,M,005.5,N,010.2,K*48\r\n"


def with_cs(body: str) -> bytes:
    """A sentence we construct (checksum computed, not a published golden value)."""
    return f"${body}*{checksum(body.encode()):02X}".encode()


GNGGA = with_cs("GNGGA,092725.00,4717.11399,N,00833.91590,E,1,08,1.01,499.6,M,48.0,M,,")


def values(s: bytes) -> dict[str, float]:
    parsed = parse_sentence(s)
    assert parsed is not None
    return {r.channel: r.value for r in parsed.readings}


def test_published_checksums_match() -> None:
    for s in (GGA, RMC, VTG):
        body, _, tail = s.strip().partition(b"*")
        assert checksum(body[1:]) == int(tail, 16)


def test_gga_golden() -> None:
    v = values(GGA)
    assert v["lat_deg"] == pytest.approx(48 + 7.038 / 60)
    assert v["lon_deg"] == pytest.approx(11 + 31.0 / 60)
    assert v["alt_m"] == 545.4
    assert v["fix_quality"] == 1
    assert v["satellites"] == 8


def test_rmc_and_vtg_golden() -> None:
    v = values(RMC)
    assert v["speed_kn"] == 22.4 and v["course_deg"] == 84.4
    assert v["lat_deg"] == pytest.approx(48.1173)
    w = values(VTG)
    assert w == {"course_deg": 54.7, "speed_kn": 5.5}


def test_talkers_and_hemispheres() -> None:
    s = parse_sentence(GNGGA)
    assert s is not None and s.talker == "GN" and s.type == "GGA"
    body = "GLGGA,000000,3352.000,S,15112.000,W,2,11,0.8,10.0,M,0,M,,"
    line = f"${body}*{checksum(body.encode()):02X}".encode()
    v = values(line)
    assert v["lat_deg"] == pytest.approx(-(33 + 52 / 60))
    assert v["lon_deg"] == pytest.approx(-(151 + 12 / 60))
    assert v["fix_quality"] == 2


def test_no_fix_and_void_status() -> None:
    body = "GPGGA,123519,,,,,0,00,,,M,,M,,"
    s = parse_sentence(f"${body}*{checksum(body.encode()):02X}".encode())
    assert s is not None
    chans = {r.channel: r for r in s.readings}
    assert "lat_deg" not in chans and chans["fix_quality"].value == 0
    body = "GPRMC,123519,V,4807.038,N,01131.000,E,,,230394,,,N"
    s = parse_sentence(f"${body}*{checksum(body.encode()):02X}".encode())
    assert s is not None
    assert {r.quality for r in s.readings} == {Quality.UNCERTAIN}


def test_bad_checksum_and_syntax_are_frame_errors() -> None:
    with pytest.raises(FrameError) as e:
        parse_sentence(GGA.replace(b"*47", b"*48"))
    assert e.value.kind == "checksum" and "computed 47" in str(e.value)
    with pytest.raises(FrameError, match="missing"):
        parse_sentence(b"$GPGGA,123519,4807.038,N")
    body = "GPGGA,123519,4867.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"  # 67 minutes
    with pytest.raises(FrameError, match="minutes"):
        parse_sentence(f"${body}*{checksum(body.encode()):02X}".encode())
    body = "GPXXX,1,2"
    assert parse_sentence(f"${body}*{checksum(body.encode()):02X}".encode()) is None


@dataclass
class Fix:
    lat_deg: float
    lon_deg: float
    alt_m: float = 12.5
    speed_kn: float = 4.25
    course_deg: float = 271.5
    fix_quality: int = 1
    satellites: int = 9
    utc: dt.datetime = dt.datetime(2026, 11, 29, 5, 0, 0, tzinfo=dt.UTC)


def test_emulator_formatting_round_trips() -> None:
    for lat, lon in [(47.3, 8.5), (-33.86, 151.2), (0.0, -0.0001), (89.9999999, -179.9999999)]:
        f = Fix(lat, lon)
        g = values(format_gga(f, "GN"))
        assert g["lat_deg"] == pytest.approx(lat, abs=1e-6)
        assert g["lon_deg"] == pytest.approx(lon, abs=1e-6)
        r = values(format_rmc(f))
        assert r["speed_kn"] == 4.25 and r["course_deg"] == 271.5
        assert values(format_vtg(f)) == {"course_deg": 271.5, "speed_kn": 4.25}


def _cfg(path: str, **kw: object) -> NmeaConfig:
    return msgspec.convert({"driver": "nmea", "id": "gps", "port": path, **kw}, NmeaConfig)


async def test_sensor_against_emulator_with_scenario(
    link: Path, resources: object, loop_guard: object
) -> None:
    scen = Scenario(seed=7)
    async with NmeaGpsEmulator(link, fix=scen.gps, rate_hz=20, talker="GN") as emu:
        sensor = NmeaSensor(_cfg(emu.path, rate_hz=20), resources)  # type: ignore[arg-type]
        await sensor.open()
        got: dict[str, float] = {}
        it = sensor.frames().__aiter__()
        async with asyncio.timeout(10):
            while len(got) < 7:
                for r in await it.__anext__():
                    got[r.channel] = r.value
        t = emu.now()
        truth = scen.gps(t)
        # the track moves slowly; a fix from a few epochs ago is within metres
        assert got["lat_deg"] == pytest.approx(truth.lat_deg, abs=1e-3)
        assert got["lon_deg"] == pytest.approx(truth.lon_deg, abs=1e-3)
        assert got["satellites"] == pytest.approx(truth.satellites, abs=3)
        assert sensor.counters["frame_errors"] == 0
        frames = sensor.port.recent_frames(3)
        assert frames and frames[-1][1].startswith(b"$GN")
        await sensor.close()


async def _collect(sensor: NmeaSensor, n: int) -> int:
    it = sensor.frames().__aiter__()
    count = 0
    async with asyncio.timeout(10):
        while count < n:
            await it.__anext__()
            count += 1
    return count


@pytest.mark.parametrize("kind", ["bit_flip", "truncate", "garbage"])
async def test_fault_injection_counted_and_skipped(
    kind: str, link: Path, resources: object
) -> None:
    fix = Fix(47.0, 8.0)
    async with NmeaGpsEmulator(link, fix=lambda t: fix, rate_hz=50, seed=3) as emu:
        sensor = NmeaSensor(_cfg(emu.path, rate_hz=50), resources)  # type: ignore[arg-type]
        await sensor.open()
        await _collect(sensor, 3)
        emu.inject(kind, 4)  # type: ignore[arg-type]
        await _collect(sensor, 12)
        c = sensor.counters
        if kind == "garbage":
            # junk before a sentence fails the '$' check and costs that one line
            assert c["syntax_errors"] >= 1
        elif kind == "bit_flip":
            assert c["checksum_errors"] + c["syntax_errors"] == 4
        else:
            assert c["frame_errors"] == 4
        assert c["frames"] >= 15
        await sensor.close()


async def test_stall_is_device_error_then_recovers(
    link: Path, resources: object, loop_guard: object
) -> None:
    async with NmeaGpsEmulator(link, fix=lambda t: Fix(1.0, 2.0), rate_hz=20) as emu:
        sensor = NmeaSensor(_cfg(emu.path, rate_hz=20, read_timeout_ms=200), resources)  # type: ignore[arg-type]
        await sensor.open()
        await _collect(sensor, 2)
        emu.stall()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DeviceError, match="stalled"):
            await _collect(sensor, 100)
        assert 0.15 < loop.time() - t0 < 3.0
        emu.unstall()
        assert await _collect(sensor, 3) == 3
        await sensor.close()


async def test_unplug_and_replug(link: Path, resources: object, loop_guard: object) -> None:
    async with NmeaGpsEmulator(link, fix=lambda t: Fix(1.0, 2.0), rate_hz=20) as emu:
        sensor = NmeaSensor(_cfg(emu.path, rate_hz=20), resources)  # type: ignore[arg-type]
        await sensor.open()
        await _collect(sensor, 2)
        emu.unplug()
        with pytest.raises(DeviceError):
            await _collect(sensor, 100)
        with pytest.raises(DeviceError, match="does not exist"):
            await sensor.open()  # the hub's re-probe while the adapter is away
        emu.replug()
        await sensor.open()
        assert await _collect(sensor, 3) == 3
        await sensor.close()
        assert not sensor.port.is_open


def test_config_errors() -> None:
    with pytest.raises(msgspec.ValidationError, match="absolute device path"):
        _cfg("ttyUSB0")
    with pytest.raises(msgspec.ValidationError, match="socket://HOST:PORT"):
        _cfg("socket://nohost")
    with pytest.raises(msgspec.ValidationError, match="baudrate"):
        _cfg("/dev/ttyUSB0", baudrate=12345)
    with pytest.raises(msgspec.ValidationError):
        _cfg("/dev/ttyUSB0", sentences=["GSV"])
    assert _cfg("socket://127.0.0.1:7000").port == "socket://127.0.0.1:7000"


async def test_random_fault_rates_exact_accounting(link: Path, resources: object) -> None:
    """Every sentence sent is either delivered or counted as an error: nothing vanishes."""
    from drivers.emulated.serial import Faults

    async with NmeaGpsEmulator(
        link,
        fix=lambda t: Fix(10.0, 20.0),
        rate_hz=100,
        seed=9,
        faults=Faults(bit_flip=0.2, truncate=0.1),
    ) as emu:
        sensor = NmeaSensor(_cfg(emu.path, rate_hz=100, read_timeout_ms=300), resources)  # type: ignore[arg-type]
        # what a device says before we listen is lost (the open flushes the tty): count
        # only from the moment the port is open
        emu.stall()
        await sensor.open()
        for k in emu.counters:
            emu.counters[k] = 0
        emu.unstall()
        await _collect(sensor, 30)
        emu.stall()
        with pytest.raises(DeviceError, match="stalled"):
            await _collect(sensor, 10_000)  # drain until the line is quiet
        c = sensor.counters
        assert emu.counters["frames_corrupted"] > 0
        assert c["frame_errors"] == emu.counters["frames_corrupted"]
        assert c["frames"] + c["frame_errors"] == emu.counters["frames_sent"]
        await sensor.close()
