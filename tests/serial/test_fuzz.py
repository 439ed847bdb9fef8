"""Hypothesis fuzzing of every serial parser: random bytes give readings or our own
FrameError, never another exception, never a hang (each example is bounded in size and
the parsers are linear; pytest-timeout catches a hang)."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import Reading
from drivers.errors import FrameError
from drivers.serial.cobs import CobsField, CobsLayout, cobs_decode, cobs_encode
from drivers.serial.common import DelimitedFramer
from drivers.serial.line import LineField, LineParser
from drivers.serial.modbus import decode_value, parse_response, response_length
from drivers.serial.nmea import checksum, parse_sentence

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LINE_PARSERS = [
    LineParser("csv", [LineField(name="a"), LineField(name="b", column=3, scale=1e300)]),
    LineParser("kv", [LineField(name="a", key="T"), LineField(name="b")]),
    LineParser("json", [LineField(name="a", key="x.y"), LineField(name="b", scale=-2.0)]),
]


def _check(readings: list[Reading]) -> None:
    for r in readings:
        assert isinstance(r.value, float)
        assert not math.isinf(r.value)


@FUZZ
@given(st.binary(max_size=600))
def test_line_parsers(data: bytes) -> None:
    framer = DelimitedFramer(b"\n", 128)
    for line in framer.feed(data):
        assert len(line) <= 128
        for p in LINE_PARSERS:
            try:
                _check(p.parse(line))
            except FrameError:
                pass


@FUZZ
@given(st.text(alphabet='0123456789.,-+eE=:;{}[]"xyTab nai\t', max_size=120))
def test_line_parsers_structured(text: str) -> None:
    for p in LINE_PARSERS:
        try:
            _check(p.parse(text.encode()))
        except FrameError:
            pass


@FUZZ
@given(st.binary(max_size=200))
def test_nmea_random_bytes(data: bytes) -> None:
    try:
        parse_sentence(data)
    except FrameError:
        pass


FIELD = st.text(alphabet="0123456789.NSEWAVMTK-", max_size=12)


@FUZZ
@given(
    st.sampled_from(["GPGGA", "GNRMC", "GLVTG", "GPGSV", "PUBX", "GP"]),
    st.lists(FIELD, max_size=16),
)
def test_nmea_valid_checksum_random_fields(addr: str, fields: list[str]) -> None:
    """Checksum right, content random: reaches the field parsers."""
    body = ",".join([addr, *fields])
    line = f"${body}*{checksum(body.encode()):02X}".encode()
    try:
        s = parse_sentence(line)
    except FrameError:
        return
    if s is not None:
        _check(list(s.readings))
        for r in s.readings:
            if r.channel == "lat_deg":
                assert -90 <= r.value <= 90
            if r.channel == "lon_deg":
                assert -180 <= r.value <= 180


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 255), st.sampled_from([3, 4, 6, 16]))
def test_modbus_response_parser(data: bytes, unit: int, fc: int) -> None:
    n = response_length(fc, data[:3])
    assert n is None or 5 <= n <= 260
    try:
        out = parse_response(data, unit, fc, count=0)
    except FrameError:
        return
    if isinstance(out, list):
        assert all(0 <= v <= 0xFFFF for v in out)


@FUZZ
@given(st.binary(min_size=2, max_size=300), st.integers(1, 247), st.sampled_from([3, 4, 6, 16]))
def test_modbus_parser_with_valid_crc(body: bytes, unit: int, fc: int) -> None:
    """CRC right, content random: the structural checks must hold."""
    from drivers.serial.modbus import crc16

    frame = bytes([unit]) + body[1:] if body else bytes([unit])
    frame = frame + crc16(frame).to_bytes(2, "little")
    try:
        out = parse_response(frame, unit, fc)
    except FrameError:
        return
    if isinstance(out, list):
        for t in ("int16", "uint16", "int32", "uint32", "float32"):
            try:
                decode_value(out, t, "little")
            except FrameError:
                pass


@FUZZ
@given(st.binary(max_size=400))
def test_cobs_decode_random(data: bytes) -> None:
    layout = CobsLayout([CobsField(name="a", type="u16"), CobsField(name="b", type="f32")])
    framer = DelimitedFramer(b"\x00", 64)
    for frame in framer.feed(data):
        try:
            cobs_decode(frame)
        except FrameError:
            pass
        try:
            for r in layout.decode(frame):
                assert isinstance(r.value, float)
        except FrameError:
            pass


@FUZZ
@given(st.binary(max_size=600))
def test_cobs_round_trip(data: bytes) -> None:
    enc = cobs_encode(data)
    assert 0 not in enc
    assert len(enc) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(enc) == data


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=20), st.integers(1, 40))
def test_framer_matches_split(chunks: list[bytes], max_len: int) -> None:
    """Whatever the chunking, frames are the delimiter-separated pieces no longer than max."""
    data = b"".join(chunks)
    f = DelimitedFramer(b"\n", max_len)
    got = [fr for c in chunks for fr in f.feed(c)]
    pieces = data.split(b"\n")[:-1]  # the tail has no delimiter yet
    # a piece longer than max_len is dropped; a piece right after it is kept
    assert got == [p for p in pieces if len(p) <= max_len]


# -- the whole path: random line noise through a real pty into each stream sensor ----------
async def _noise_run(make_emu, make_sensor, link, resources) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import random

    rng = random.Random(1234)
    async with make_emu(link) as emu:
        sensor = make_sensor(emu.path, resources)
        await sensor.open()
        it = sensor.frames().__aiter__()
        got = 0
        async with asyncio.timeout(20):
            while got < 20:
                emu.write_raw(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
                readings = await it.__anext__()  # only DeviceError could escape: none expected
                for r in readings:
                    assert isinstance(r.value, float)
                got += 1
        assert sensor.counters["frames"] >= 20
        await sensor.close()


async def test_noise_through_pty_nmea(link, resources) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt
    from types import SimpleNamespace

    import msgspec

    from drivers.emulated.nmea_gps import NmeaGpsEmulator
    from drivers.serial.nmea import NmeaConfig, NmeaSensor

    fix = SimpleNamespace(
        lat_deg=1.0,
        lon_deg=2.0,
        alt_m=3.0,
        speed_kn=0.0,
        course_deg=0.0,
        fix_quality=1,
        satellites=7,
        utc=dt.datetime(2026, 1, 1),
    )
    await _noise_run(
        lambda p: NmeaGpsEmulator(p, fix=lambda t: fix, rate_hz=50),
        lambda path, res: NmeaSensor(
            msgspec.convert({"driver": "nmea", "id": "g", "port": path, "rate_hz": 50}, NmeaConfig),
            res,
        ),
        link,
        resources,
    )


async def test_noise_through_pty_line(link, resources) -> None:  # type: ignore[no-untyped-def]
    import msgspec

    from drivers.emulated.line_instrument import LineInstrumentEmulator
    from drivers.serial.line import LineConfig, LineSensor

    await _noise_run(
        lambda p: LineInstrumentEmulator(
            p, values=lambda t: {"a": 1.0}, fields=["a"], format="json", rate_hz=50
        ),
        lambda path, res: LineSensor(
            msgspec.convert(
                {
                    "driver": "line",
                    "id": "l",
                    "port": path,
                    "rate_hz": 50,
                    "format": "json",
                    "fields": [{"name": "a"}],
                },
                LineConfig,
            ),
            res,
        ),
        link,
        resources,
    )


async def test_noise_through_pty_cobs(link, resources) -> None:  # type: ignore[no-untyped-def]
    import msgspec

    from drivers.emulated.cobs_device import CobsDeviceEmulator
    from drivers.serial.cobs import CobsConfig, CobsSensor

    fields = [CobsField(name="a", type="u16"), CobsField(name="b", type="f32")]
    await _noise_run(
        lambda p: CobsDeviceEmulator(p, fields=fields, values=lambda t: [1, 2.0], rate_hz=50),
        lambda path, res: CobsSensor(
            msgspec.convert(
                {
                    "driver": "cobs",
                    "id": "c",
                    "port": path,
                    "rate_hz": 50,
                    "fields": [{"name": "a", "type": "u16"}, {"name": "b", "type": "f32"}],
                },
                CobsConfig,
            ),
            res,
        ),
        link,
        resources,
    )
