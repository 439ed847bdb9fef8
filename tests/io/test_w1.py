"""DS18B20 over the kernel's w1 sysfs files, against a sysfs-shaped tree in tmp_path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from drivers.errors import DeviceError, FrameError
from drivers.registry import sensor_drivers
from drivers.w1 import DS18B20, DS18B20Config, PowerOnFilter, crc8, list_probes, parse_w1_slave
from tests.hub.conftest import wait_for
from tests.i2c.helpers import cfg
from tests.io.helpers import runtime

# Scratchpads as a DS18B20 returns them (CRC in byte 8, Dallas CRC-8 over bytes 0..7).
PAD_23_125 = "72 01 4b 46 7f ff 0e 10 57"  # 0x0172 / 16 = 23.125 °C
PAD_85 = "50 05 4b 46 7f ff 0c 10 1c"  # the power-on value 0x0550


def w1_text(pad: str, milli_c: int, ok: bool | None = None) -> str:
    b = bytes.fromhex(pad.replace(" ", ""))
    verdict = ok if ok is not None else crc8(b) == 0
    return f"{pad} : crc={b[8]:02x} {'YES' if verdict else 'NO'}\n{pad} t={milli_c}\n"


def pad_for(raw: int) -> str:
    body = bytes([raw & 0xFF, raw >> 8 & 0xFF, 0x4B, 0x46, 0x7F, 0xFF, 0x0E, 0x10])
    return (body + bytes([crc8(body)])).hex(" ")


def probe(root: Path, rom: str, text: str) -> Path:
    d = root / rom
    d.mkdir(parents=True, exist_ok=True)
    (d / "w1_slave").write_text(text)
    return d


def test_crc_and_parser() -> None:
    assert crc8(bytes.fromhex(PAD_23_125.replace(" ", ""))) == 0
    r = parse_w1_slave(w1_text(PAD_23_125, 23125))
    assert r.crc_ok and r.milli_c == 23125 and r.scratchpad[0] == 0x72
    assert not parse_w1_slave(w1_text(PAD_23_125, 23125, ok=False)).crc_ok
    for bad in ("", "garbage\n", "72 01 : crc=57 YES\n72 01 t=1\n", "zz : crc=57 YES\nzz t=x\n"):
        with pytest.raises(FrameError):
            parse_w1_slave(bad)


def test_power_on_filter() -> None:
    f = PowerOnFilter(repeats=3)
    assert f.accept(21000)
    assert not f.accept(85000) and not f.accept(85000)  # a brown-out: refused
    assert f.accept(85000)  # ...but the third in a row is taken as real
    assert f.accept(21000) and not f.accept(85000)  # a new run starts from zero
    g = PowerOnFilter(repeats=3)
    assert g.accept(83500) and g.accept(85000)  # a hot process moving through 85.0
    assert not PowerOnFilter(repeats=2).accept(85000)  # nothing known before: refused


def test_config_and_registry(tmp_path: Path) -> None:
    assert sensor_drivers()["ds18b20"].config_type is DS18B20Config
    c = cfg(DS18B20Config, device="28-0316a2791aff")
    assert c.read_timeout_ms == 2000 and c.rate_hz == 0.5  # a conversion takes 750 ms
    with pytest.raises(msgspec.ValidationError, match="ROM id"):
        cfg(DS18B20Config, device="28-XYZ")
    probe(tmp_path, "28-0316a2791aff", "")
    probe(tmp_path, "3b-000000000001", "")
    (tmp_path / "w1_bus_master1").mkdir()
    (tmp_path / "00-800000000000").mkdir()  # unknown family: not a temperature probe
    assert list_probes(str(tmp_path)) == ["28-0316a2791aff", "3b-000000000001"]


async def test_reads_temperature_and_negative_values(tmp_path: Path) -> None:
    d = probe(tmp_path, "28-0316a2791aff", w1_text(PAD_23_125, 23125))
    s = DS18B20(cfg(DS18B20Config, sysfs_root=str(tmp_path)))  # the only probe: found
    await s.open()
    assert s.device == "28-0316a2791aff"
    assert [r.value for r in await s.read()] == [23.125]
    (d / "w1_slave").write_text(w1_text(pad_for(0xFF5E), -10125))  # -10.125 °C
    assert (await s.read())[0].value == -10.125
    assert s.counters["reads"] == 2


async def test_crc_no_is_a_counted_frame_error_and_skipped(tmp_path: Path) -> None:
    d = probe(tmp_path, "28-0316a2791aff", w1_text(PAD_23_125, 23125, ok=False))
    c = cfg(DS18B20Config, sysfs_root=str(tmp_path), retries=0, fail_after=100)
    s = DS18B20(c)
    rt, acq, got = runtime(c, s)
    assert await acq.open() is None
    why = await acq.read_once()
    assert why is not None and "crc" in why
    assert rt.counters.frame_errors == 1 and s.counters["crc_errors"] == 1 and not got
    # a kernel "YES" over bytes that do not check is refused too
    (d / "w1_slave").write_text(w1_text("72 01 4b 46 7f ff 0e 10 58", 23125, ok=True))
    assert await acq.read_once() is not None and s.counters["crc_errors"] == 2
    (d / "w1_slave").write_text(w1_text(PAD_23_125, 23125))
    assert await acq.read_once() is None and got[-1].value == 23.125


async def test_all_zero_scratchpad_is_no_data(tmp_path: Path) -> None:
    probe(tmp_path, "28-0316a2791aff", w1_text("00 00 00 00 00 00 00 00 00", 0, ok=True))
    s = DS18B20(cfg(DS18B20Config, sysfs_root=str(tmp_path)))
    await s.open()
    with pytest.raises(FrameError, match="no_data"):
        await s.read()


async def test_power_on_value_refused_then_accepted_when_repeated(tmp_path: Path) -> None:
    d = probe(tmp_path, "28-0316a2791aff", w1_text(PAD_23_125, 23125))
    s = DS18B20(cfg(DS18B20Config, sysfs_root=str(tmp_path), power_on_repeats=2))
    await s.open()
    await s.read()
    (d / "w1_slave").write_text(w1_text(PAD_85, 85000))
    with pytest.raises(FrameError, match="power_on"):
        await s.read()
    assert s.counters["power_on_values"] == 1
    assert (await s.read())[0].value == 85.0  # repeated: a real 85.0 °C


async def test_temperature_interface(tmp_path: Path) -> None:
    d = tmp_path / "28-0316a2791aff"
    d.mkdir()
    (d / "temperature").write_text("19437\n")
    s = DS18B20(cfg(DS18B20Config, sysfs_root=str(tmp_path), interface="temperature"))
    await s.open()
    assert (await s.read())[0].value == 19.437


async def test_missing_probe_fails_the_sensor(tmp_path: Path) -> None:
    d = probe(tmp_path, "28-0316a2791aff", w1_text(PAD_23_125, 23125))
    c = cfg(
        DS18B20Config,
        device="28-0316a2791aff",
        sysfs_root=str(tmp_path),
        rate_hz=50.0,
        retries=0,
        fail_after=2,
        reprobe_s=0.1,
    )
    rt, acq, got = runtime(c, DS18B20(c))
    task = asyncio.create_task(acq.run_polled())
    try:
        await wait_for(lambda: len(got) >= 1)
        (d / "w1_slave").unlink()
        d.rmdir()  # the master lost the probe: its directory goes
        await wait_for(lambda: rt.health.state == "failed")
        assert rt.counters.read_errors >= 2
        # re-probe finds it again
        probe(tmp_path, "28-0316a2791aff", w1_text(PAD_23_125, 23125))
        n = len(got)
        await wait_for(lambda: rt.health.state == "ok" and len(got) > n)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    s = DS18B20(cfg(DS18B20Config, device="28-000000000099", sysfs_root=str(tmp_path)))
    with pytest.raises(DeviceError, match=r"no such probe .*found: 28-0316a2791aff"):
        await s.open()


def test_the_daemon_reads_a_probe_and_marks_it_failed_when_it_goes(tmp_path: Path) -> None:
    """The real daemon, configured with a ds18b20 over a sysfs-shaped tree."""
    import time

    from tests.helpers.daemon import DaemonProcess

    root = tmp_path / "w1"
    d = probe(root, "28-0316a2791aff", w1_text(PAD_23_125, 23125))
    sensor = {
        "id": "tank",
        "driver": "ds18b20",
        "device": "28-0316a2791aff",
        "sysfs_root": str(root),
        "rate_hz": 20,
        "fail_after": 2,
        "retries": 0,
    }
    (tmp_path / "d").mkdir()
    with DaemonProcess(tmp_path / "d", {"sensors": [sensor]}) as dp:
        dp.wait_ready(60)

        def tank() -> dict[str, object]:
            return next(s for s in dp.call("sensors") if s["id"] == "tank")

        deadline = time.monotonic() + 20
        while tank()["state"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        s = tank()
        assert (
            s["state"] == "ok" and "23.12" in str(s["value"]) and s["where"] == "w1 28-0316a2791aff"
        )
        (d / "w1_slave").unlink()
        d.rmdir()
        while tank()["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.1)
        s = tank()
        assert s["state"] == "failed" and "probe gone" in str(s["last_error"])
