"""Modbus RTU: published CRC vectors, codec golden values, master vs the pty slave."""

from __future__ import annotations

import asyncio
import itertools
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest

from drivers.emulated.modbus_slave import ModbusSlaveEmulator, ModbusUnit
from drivers.errors import DeviceError, FrameError
from drivers.serial.modbus import (
    ModbusConfig,
    ModbusException,
    ModbusMaster,
    ModbusRegister,
    ModbusSensor,
    build_read,
    build_write_multiple,
    build_write_single,
    crc16,
    decode_value,
    encode_value,
    inter_frame_gap_s,
    parse_response,
    plan_reads,
    response_length,
)
from drivers.serial.modbus_actuator import ModbusWriteActuator, ModbusWriteConfig
from drivers.serial.port import AsyncSerialPort


# -- golden vectors ------------------------------------------------------------------------
def test_published_crc_vectors() -> None:
    # Modbus over Serial Line spec / simplymodbus.ca examples, CRC as sent on the wire
    assert build_read(1, 3, 0, 10) == bytes.fromhex("01030000000AC5CD")
    assert build_read(1, 3, 0, 1) == bytes.fromhex("010300000001840A")
    assert build_read(0x11, 3, 0x006B, 3) == bytes.fromhex("1103006B00037687")
    assert build_write_single(0x11, 0x0001, 0x0003) == bytes.fromhex("110600010003" + "9A9B")
    # CRC-16/MODBUS catalogue check value
    assert crc16(b"123456789") == 0x4B37


def test_simplymodbus_fc16_request() -> None:
    req = build_write_multiple(0x11, 0x0001, [0x000A, 0x0102])
    assert req[:-2] == bytes.fromhex("1110000100020400 0A0102".replace(" ", ""))
    assert req[-2:] == crc16(req[:-2]).to_bytes(2, "little")


def _resp(pdu: bytes) -> bytes:
    return pdu + crc16(pdu).to_bytes(2, "little")


def test_parse_response_and_exceptions() -> None:
    # simplymodbus FC3 response example: 3 registers AE41 5652 4340
    frame = _resp(bytes.fromhex("110306AE415652434049AD")[:-2])
    assert parse_response(frame, 0x11, 3, count=3) == [0xAE41, 0x5652, 0x4340]
    assert frame == bytes.fromhex("110306AE415652434049AD")
    with pytest.raises(ModbusException) as e:
        parse_response(_resp(bytes([3, 0x83, 0x02])), 3, 3)
    assert str(e.value) == "exception_response: unit 3 function 3: ILLEGAL DATA ADDRESS (02)"
    assert isinstance(e.value, FrameError) and e.value.code == 2
    bad = bytearray(frame)
    bad[4] ^= 0x10
    with pytest.raises(FrameError) as e2:
        parse_response(bytes(bad), 0x11, 3)
    assert e2.value.kind == "crc"
    with pytest.raises(FrameError, match="expected a response from unit 17"):
        parse_response(_resp(bytes.fromhex("120302AE41")), 0x11, 3)
    with pytest.raises(FrameError, match="expected 2 registers"):
        parse_response(frame, 0x11, 3, count=2)


def test_response_length() -> None:
    assert response_length(3, b"\x01") is None
    assert response_length(3, b"\x01\x03") is None
    assert response_length(3, b"\x01\x03\x14") == 25
    assert response_length(3, b"\x01\x83") == 5
    assert response_length(6, b"\x01\x06") == 8
    assert response_length(16, b"\x01\x10") == 8


def test_value_codec_golden() -> None:
    assert decode_value([0x3F80, 0x0000], "float32") == 1.0
    assert decode_value([0x0000, 0x3F80], "float32", "little") == 1.0
    assert decode_value([0x4049, 0x0FDB], "float32") == pytest.approx(3.14159265)
    assert decode_value([0xFFFF], "int16") == -1
    assert decode_value([0xFFFF], "uint16") == 65535
    assert decode_value([0x0001, 0x0000], "uint32") == 65536
    assert decode_value([0x0000, 0x0001], "uint32", "little") == 65536
    assert decode_value([0xFFFF, 0xFFFE], "int32") == -2
    for t, v in [
        ("int16", -1234),
        ("uint16", 4321),
        ("int32", -70000),
        ("uint32", 3_000_000_000),
        ("float32", 12.5),
    ]:
        for wo in ("big", "little"):
            assert decode_value(encode_value(v, t, wo), t, wo) == v
    with pytest.raises(ValueError, match="does not fit uint16"):
        encode_value(70000, "uint16")
    with pytest.raises(ValueError, match="does not fit int16"):
        encode_value(-40000, "int16")


def test_inter_frame_gap() -> None:
    assert inter_frame_gap_s(9600, 10 / 9600) == pytest.approx(3.5 * 10 / 9600)  # 3.65 ms
    assert inter_frame_gap_s(115200, 10 / 115200) == 0.00175
    assert inter_frame_gap_s(19200, 11 / 19200) == pytest.approx(3.5 * 11 / 19200)


def test_plan_reads_groups_contiguous_blocks() -> None:
    regs = [
        ModbusRegister(name="a", address=0),
        ModbusRegister(name="b", address=2, type="float32"),
        ModbusRegister(name="c", address=100),
        ModbusRegister(name="d", address=5, function=4),
    ]
    blocks = plan_reads(regs, max_gap=8)
    assert [(b.function, b.address, b.count) for b in blocks] == [(3, 0, 4), (3, 100, 1), (4, 5, 1)]
    big = [ModbusRegister(name=f"r{i}", address=i * 2, type="uint32") for i in range(100)]
    assert all(b.count <= 125 for b in plan_reads(big))


def _cfg(**kw: object) -> ModbusConfig:
    base: dict[str, object] = {
        "driver": "modbus",
        "id": "meter",
        "port": "/dev/ttyUSB0",
        "unit": 1,
        "registers": [{"name": "v", "address": 0}],
    }
    return msgspec.convert({**base, **kw}, ModbusConfig)


def test_config_refuses_impossible_maps() -> None:
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'float64'"):
        _cfg(registers=[{"name": "v", "address": 0, "type": "float64"}])
    with pytest.raises(msgspec.ValidationError, match="does not fit"):
        _cfg(registers=[{"name": "v", "address": 65535, "type": "uint32"}])
    with pytest.raises(msgspec.ValidationError, match=r"slave id 1\.\.247"):
        _cfg(unit=0)
    with pytest.raises(msgspec.ValidationError):
        _cfg(registers=[{"name": "v", "address": 0, "function": 6}])
    with pytest.raises(msgspec.ValidationError, match="word_order"):
        _cfg(registers=[{"name": "v", "address": 0, "word_order": "middle"}])
    with pytest.raises(msgspec.ValidationError, match="duplicate"):
        _cfg(registers=[{"name": "v", "address": 0}, {"name": "v", "address": 1}])
    with pytest.raises(msgspec.ValidationError, match="non-zero"):
        _cfg(registers=[{"name": "v", "address": 0, "scale": 0}])
    with pytest.raises(msgspec.ValidationError, match="use 16"):
        msgspec.convert(
            {
                "driver": "modbus_write",
                "port": "/dev/ttyUSB0",
                "unit": 1,
                "address": 0,
                "type": "float32",
                "function": 6,
            },
            ModbusWriteConfig,
        )


# -- against the emulated slave --------------------------------------------------------------
def _units() -> dict[int, ModbusUnit]:
    meter = ModbusUnit(holding={a: 0 for a in range(20)}, inputs={a: a for a in range(10)})
    meter.set(0, 2305, "uint16")  # voltage in 0.1 V
    meter.set(2, 12.5, "float32", "little")  # current A, little word order
    meter.set(4, -150, "int16")  # temperature in 0.1 degC
    drive = ModbusUnit(holding={a: 0 for a in range(10)})
    drive.set(0, 1_234_567, "uint32")
    return {1: meter, 7: drive}


async def test_sensor_reads_register_map(link: Path, resources: object, loop_guard: object) -> None:
    async with ModbusSlaveEmulator(link, units=_units()) as emu:
        cfg = _cfg(
            port=emu.path,
            baudrate=115200,
            registers=[
                {"name": "voltage_v", "address": 0, "scale": 0.1, "unit": "V"},
                {
                    "name": "current_a",
                    "address": 2,
                    "type": "float32",
                    "word_order": "little",
                    "unit": "A",
                },
                {"name": "temp_c", "address": 4, "type": "int16", "scale": 0.1, "offset": 0.0},
                {"name": "in3", "address": 3, "function": 4, "scale": 2.0, "offset": 1.0},
            ],
        )
        sensor = ModbusSensor(cfg, resources)  # type: ignore[arg-type]
        await sensor.open()
        r = {x.channel: x.value for x in await sensor.read()}
        assert r == pytest.approx(
            {"voltage_v": 230.5, "current_a": 12.5, "temp_c": -15.0, "in3": 7.0}
        )
        assert [x.channel for x in await sensor.read()] == [
            "voltage_v",
            "current_a",
            "temp_c",
            "in3",
        ]
        assert emu.counters["requests"] == 4  # two reads x (one FC3 block + one FC4 block)
        assert sensor.port.recent_frames(1)[0][1][:2] == bytes([1, 4])
        await sensor.close()


async def test_several_units_share_one_port(
    link: Path, resources: object, loop_guard: object
) -> None:
    async with ModbusSlaveEmulator(link, units=_units(), wire_baudrate=115200) as emu:
        a = ModbusSensor(
            _cfg(
                port=emu.path, baudrate=115200, id="meter", registers=[{"name": "v", "address": 0}]
            ),
            resources,
        )  # type: ignore[arg-type]
        b = ModbusSensor(
            _cfg(
                port=emu.path,
                baudrate=115200,
                id="drive",
                unit=7,
                registers=[{"name": "pos", "address": 0, "type": "uint32"}],
            ),
            resources,
        )  # type: ignore[arg-type]
        assert a.port is b.port
        await a.open()
        await b.open()
        results = await asyncio.gather(*[s.read() for _ in range(10) for s in (a, b)])
        for i, res in enumerate(results):
            want = 2305.0 if i % 2 == 0 else 1_234_567.0
            assert res[0].value == want
        assert a.counters["crc_errors"] == 0 and emu.counters["crc_errors"] == 0
        await a.close()
        assert a.port.is_open  # b still uses it
        await b.close()


async def test_exception_response_is_clear_error(link: Path) -> None:
    async with ModbusSlaveEmulator(link, units=_units()) as emu:
        port = AsyncSerialPort(emu.path, baudrate=19200)
        await port.open()
        m = ModbusMaster(port, timeout_s=1.0)
        with pytest.raises(ModbusException) as e:
            await m.read_registers(1, 3, 50, 2)
        assert "unit 1 function 3: ILLEGAL DATA ADDRESS (02)" in str(e.value)
        # a count of 0 (our builder refuses it, so send the raw request)
        with pytest.raises(ModbusException, match="ILLEGAL DATA VALUE \\(03\\)"):
            await m._transact(_resp(struct.pack(">BBHH", 7, 3, 0, 0)), 7, 3)
        with pytest.raises(ModbusException, match="function 43: ILLEGAL FUNCTION \\(01\\)"):
            await m._transact(_resp(bytes([1, 43, 14, 1, 0])), 1, 43)
        assert m.counters["exceptions"] == 3
        # the line is still usable after exceptions
        assert await m.read_registers(1, 3, 0, 1) == [2305]
        await port.close()


async def test_unknown_unit_times_out(link: Path, loop_guard: object) -> None:
    async with ModbusSlaveEmulator(link, units=_units()) as emu:
        port = AsyncSerialPort(emu.path, baudrate=115200)
        await port.open()
        m = ModbusMaster(port, timeout_s=0.2)
        with pytest.raises(DeviceError, match="unit 9 function 3: no response within 200 ms"):
            await m.read_registers(9, 3, 0, 1)
        assert m.counters["timeouts"] == 1
        await port.close()


@pytest.mark.parametrize(
    "kind,error", [("bit_flip", "crc"), ("truncate", "truncated"), ("garbage", "crc|syntax")]
)
async def test_corrupted_response(kind: str, error: str, link: Path) -> None:
    async with ModbusSlaveEmulator(link, units=_units(), seed=11) as emu:
        port = AsyncSerialPort(emu.path, baudrate=115200)
        await port.open()
        m = ModbusMaster(port, timeout_s=0.5, inter_byte_timeout_s=0.05)
        emu.inject(kind, 1)  # type: ignore[arg-type]
        with pytest.raises(FrameError) as e:
            await m.read_registers(1, 3, 0, 4)
        assert e.value.kind in error.split("|")
        # next exchange is clean again
        assert (await m.read_registers(1, 3, 0, 1)) == [2305]
        await port.close()


async def test_stalled_slave_then_recovers(link: Path, loop_guard: object) -> None:
    async with ModbusSlaveEmulator(link, units=_units()) as emu:
        port = AsyncSerialPort(emu.path, baudrate=9600)
        await port.open()
        m = ModbusMaster(port, timeout_s=0.15)
        emu.stall()
        with pytest.raises(DeviceError, match="no response"):
            await m.read_registers(1, 3, 0, 1)
        emu.unstall()
        assert await m.read_registers(1, 3, 0, 1) == [2305]
        await port.close()


async def test_master_keeps_inter_frame_gap(link: Path) -> None:
    """Back-to-back requests are at least t3.5 apart on the line (9600 baud: 3.65 ms)."""
    arrivals: list[float] = []

    class Timed(ModbusSlaveEmulator):
        def on_receive(self, data: bytes) -> None:
            arrivals.append(asyncio.get_running_loop().time())
            super().on_receive(data)

    async with Timed(link, units=_units()) as emu:
        port = AsyncSerialPort(emu.path, baudrate=9600)
        await port.open()
        m = ModbusMaster(port)
        for _ in range(5):
            await m.read_registers(1, 3, 0, 1)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert min(gaps) >= 3.5 * 10 / 9600
        await port.close()


async def test_unplug_replug(link: Path, resources: object) -> None:
    async with ModbusSlaveEmulator(link, units=_units()) as emu:
        sensor = ModbusSensor(_cfg(port=emu.path), resources)  # type: ignore[arg-type]
        await sensor.open()
        assert (await sensor.read())[0].value == 2305
        emu.unplug()
        with pytest.raises(DeviceError):
            await sensor.read()
        emu.replug()
        await sensor.open()
        assert (await sensor.read())[0].value == 2305
        await sensor.close()


async def test_write_actuator_fc6_and_fc16(link: Path, resources: object) -> None:
    units = _units()
    async with ModbusSlaveEmulator(link, units=units) as emu:
        setpoint = ModbusWriteActuator(
            msgspec.convert(
                {
                    "driver": "modbus_write",
                    "port": emu.path,
                    "unit": 1,
                    "address": 10,
                    "type": "int16",
                    "scale": 0.1,
                },
                ModbusWriteConfig,
            ),
            resources,
        )  # type: ignore[arg-type]
        speed = ModbusWriteActuator(
            msgspec.convert(
                {
                    "driver": "modbus_write",
                    "port": emu.path,
                    "unit": 7,
                    "address": 4,
                    "type": "float32",
                    "word_order": "little",
                },
                ModbusWriteConfig,
            ),
            resources,
        )  # type: ignore[arg-type]
        await setpoint.open()
        await speed.open()
        await setpoint.write(-12.3)
        await speed.write(1500.25)
        assert emu.writes == [
            (1, 10, [(-123) & 0xFFFF]),
            (7, 4, encode_value(1500.25, "float32", "little")),
        ]
        assert (
            decode_value([units[7].holding[4], units[7].holding[5]], "float32", "little") == 1500.25
        )
        with pytest.raises(ValueError, match="does not fit int16"):
            await setpoint.write(5000.0)
        # writing an address the slave does not have
        bad = ModbusWriteActuator(
            msgspec.convert(
                {"driver": "modbus_write", "port": emu.path, "unit": 1, "address": 300},
                ModbusWriteConfig,
            ),
            resources,
        )  # type: ignore[arg-type]
        await bad.open()
        with pytest.raises(ModbusException, match="unit 1 function 6: ILLEGAL DATA ADDRESS"):
            await bad.write(1)
        for a in (setpoint, speed, bad):
            await a.close()


async def test_silent_unit_through_the_hub_names_unit_and_applies_retries(
    link: Path, resources: Any
) -> None:
    """#12 item 15: a silent unit is `no response within 300 ms` naming unit and function
    (not the hub's `read timed out`), and `retries` immediate re-reads are made."""
    from drivers.base import SelfTimedRead
    from drivers.serial.modbus import ModbusSensor
    from edgerund.hub.acquire import Acquirer, SensorRuntime, make_slots

    async with ModbusSlaveEmulator(link, units=_units()) as emu:
        cfg = _cfg(port=emu.path, baudrate=115200, unit=9, read_timeout_ms=300, retries=2)
        sensor = ModbusSensor(cfg, resources)
        assert isinstance(sensor, SelfTimedRead)
        assert 0.3 <= sensor.read_deadline_s < 0.5
        rt = SensorRuntime(
            cfg, "modbus", "serial", emu.path, sensor, make_slots(sensor.channels, 8)
        )
        acq = Acquirer(rt, lambda s, t: None, lambda *a, **k: None)
        assert await acq.open() is None
        before = emu.counters["ignored"]
        why = await acq.read_once()
        assert why == f"modbus {emu.path}: unit 9 function 3: no response within 300 ms"
        assert rt.counters.timeouts == 0 and rt.counters.read_errors == 3
        assert sensor.counters["requests"] == 3 and sensor.counters["timeouts"] == 3
        assert emu.counters["ignored"] - before == 3  # three requests reached the line
        await acq.close()
