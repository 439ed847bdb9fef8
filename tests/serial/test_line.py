"""Line instruments: CSV, key=value, JSON lines; parser, framer, emulator, polling."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import msgspec
import numpy as np
import pytest

from drivers.base import Quality
from drivers.emulated.line_instrument import LineInstrumentEmulator, format_line
from drivers.emulated.scenario import Scenario
from drivers.errors import DeviceError, FrameError
from drivers.serial.common import DelimitedFramer
from drivers.serial.line import LineConfig, LineField, LineParser, LineSensor

FIELDS = [
    LineField(name="temp_c", scale=0.1, unit="degC"),  # instrument prints tenths of a degree
    LineField(name="rh_pct", unit="%"),
    LineField(name="p_kpa", scale=0.001, offset=0.0, unit="kPa"),  # prints Pa
]


def vals(readings: list) -> dict[str, float]:  # type: ignore[type-arg]
    return {r.channel: r.value for r in readings}


def test_csv_scale_offset_and_columns() -> None:
    p = LineParser("csv", FIELDS)
    assert vals(p.parse(b"215,40.5,101325")) == pytest.approx(
        {"temp_c": 21.5, "rh_pct": 40.5, "p_kpa": 101.325}
    )
    picked = LineParser("csv", [LineField(name="b", column=2, offset=-1.0)], delimiter=";")
    assert vals(picked.parse(b"x;y;3.5")) == {"b": 2.5}
    with pytest.raises(FrameError) as e:
        p.parse(b"215,40.5")
    assert e.value.kind == "missing_field"
    with pytest.raises(FrameError, match="expected a number"):
        p.parse(b"215,abc,1")


def test_kv_and_json() -> None:
    kv = LineParser("kv", [LineField(name="t", key="T", unit="degC"), LineField(name="h", key="H")])
    assert vals(kv.parse(b"T=21.5; H:40 X=1")) == {"t": 21.5, "h": 40.0}
    with pytest.raises(FrameError, match="not in line"):
        kv.parse(b"T=21.5")
    js = LineParser("json", [LineField(name="t", key="env.temp"), LineField(name="ok")])
    assert vals(js.parse(b'{"env": {"temp": 21.25}, "ok": true}')) == {"t": 21.25, "ok": 1.0}
    with pytest.raises(FrameError, match="not JSON"):
        js.parse(b'{"env": ')
    with pytest.raises(FrameError, match="JSON object"):
        js.parse(b"[1, 2]")


def test_nan_is_bad_quality_not_an_error() -> None:
    r = LineParser("csv", [LineField(name="a")]).parse(b"nan")
    assert math.isnan(r[0].value) and r[0].quality == Quality.BAD


def test_framer_resyncs_after_garbage_and_overlong() -> None:
    f = DelimitedFramer(b"\n", 16)
    out = f.feed(b"1,2\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")
    assert out == [b"1,2\r"]
    out = f.feed(b"yyyy\n3,4\n5,")
    assert out == [b"3,4"]  # the overlong line is dropped whole, we resync at its end
    assert f.resyncs == 1
    assert f.feed(b"6\n") == [b"5,6"]


def _cfg(path: str, **kw: object) -> LineConfig:
    base = {
        "driver": "line",
        "id": "env",
        "port": path,
        "rate_hz": 20,
        "fields": [{"name": "temp_c", "unit": "degC"}, {"name": "rh_pct", "unit": "%"}],
    }
    return msgspec.convert({**base, **kw}, LineConfig)


def test_config_errors() -> None:
    with pytest.raises(msgspec.ValidationError, match="at least one field"):
        _cfg("/dev/ttyUSB0", fields=[])
    with pytest.raises(msgspec.ValidationError, match="duplicate"):
        _cfg("/dev/ttyUSB0", fields=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(msgspec.ValidationError):
        _cfg("/dev/ttyUSB0", format="xml")
    with pytest.raises(msgspec.ValidationError, match="unknown"):
        _cfg("/dev/ttyUSB0", fields=[{"name": "a", "colour": 1}])


@pytest.mark.parametrize("fmt", ["csv", "kv", "json"])
async def test_stream_against_emulator(
    fmt: str, link: Path, resources: object, loop_guard: object
) -> None:
    scen = Scenario(seed=1)

    def values(t: float) -> dict[str, float]:
        tt = np.array([t])
        return {
            "temp_c": float(scen.cabinet_temp_c(tt)[0]),
            "rh_pct": float(scen.humidity_pct(tt)[0]),
        }

    async with LineInstrumentEmulator(
        link, values=values, fields=["temp_c", "rh_pct"], format=fmt, rate_hz=20
    ) as emu:  # type: ignore[arg-type]
        sensor = LineSensor(_cfg(emu.path, format=fmt), resources)  # type: ignore[arg-type]
        await sensor.open()
        it = sensor.frames().__aiter__()
        async with asyncio.timeout(10):
            readings = vals(list(await it.__anext__()))
        truth = values(emu.now())
        assert readings["temp_c"] == pytest.approx(truth["temp_c"], abs=0.5)
        assert readings["rh_pct"] == pytest.approx(truth["rh_pct"], abs=2.0)
        await sensor.close()


async def test_garbage_resync(link: Path, resources: object) -> None:
    good_values = {"temp_c": 21.125, "rh_pct": 47.257}
    async with LineInstrumentEmulator(
        link, values=lambda t: good_values, fields=["temp_c", "rh_pct"], rate_hz=50
    ) as emu:
        sensor = LineSensor(_cfg(emu.path, max_line_bytes=32), resources)  # type: ignore[arg-type]
        await sensor.open()
        it = sensor.frames().__aiter__()
        async with asyncio.timeout(10):
            await it.__anext__()
            emu.write_raw(b"\x00\xff" * 100)  # line noise longer than a line, no newline
            for _ in range(5):
                assert vals(list(await it.__anext__())) == good_values
        assert sensor.counters["resyncs"] == 1
        await sensor.close()


async def test_truncated_lines_never_pass_as_good(link: Path, resources: object) -> None:
    good_values = {"temp_c": 21.125, "rh_pct": 47.257}
    async with LineInstrumentEmulator(
        link, values=lambda t: good_values, fields=["temp_c", "rh_pct"], rate_hz=50, seed=5
    ) as emu:
        sensor = LineSensor(_cfg(emu.path), resources)  # type: ignore[arg-type]
        await sensor.open()
        it = sensor.frames().__aiter__()
        wrong = 0
        async with asyncio.timeout(10):
            await it.__anext__()
            emu.inject("truncate", 3)
            good = 0
            while good < 8:
                if vals(list(await it.__anext__())) == good_values:
                    good += 1
                else:
                    wrong += 1  # a cut after a digit: a line protocol cannot tell
        # each cut line was either rejected (counted) or read as a different number
        assert sensor.counters["frame_errors"] + wrong == 3
        assert emu.counters["frames_corrupted"] == 3
        await sensor.close()


async def test_poll_command(link: Path, resources: object, loop_guard: object) -> None:
    async with LineInstrumentEmulator(
        link,
        values=lambda t: {"temp_c": 5.0, "rh_pct": 6.0},
        fields=["temp_c", "rh_pct"],
        rate_hz=1,
        poll_command=b"READ?\r\n",
    ) as emu:
        sensor = LineSensor(
            _cfg(emu.path, poll_command="READ?\r\n", rate_hz=20, read_timeout_ms=300, retries=1),
            resources,
        )  # type: ignore[arg-type]
        await sensor.open()
        it = sensor.frames().__aiter__()
        async with asyncio.timeout(10):
            for _ in range(3):
                assert vals(list(await it.__anext__())) == {"temp_c": 5.0, "rh_pct": 6.0}
        assert emu.counters["frames_sent"] >= 3
        emu.stall()
        with pytest.raises(DeviceError, match="no complete frame"):
            async with asyncio.timeout(10):
                await it.__anext__()
        assert sensor.counters["timeouts"] == 2  # first try + 1 retry
        await sensor.close()


def test_format_line_matches_parser() -> None:
    for fmt in ("csv", "kv", "json"):
        line = format_line(fmt, ["a", "b"], {"a": 1.5, "b": -2.25})  # type: ignore[arg-type]
        parser = LineParser(fmt, [LineField(name="a"), LineField(name="b")])  # type: ignore[arg-type]
        assert vals(parser.parse(line.rstrip(b"\r\n"))) == {"a": 1.5, "b": -2.25}
