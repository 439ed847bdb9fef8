"""AsyncI2CBus: error mapping, one worker per bus, serialisation, the loop never blocks."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from typing import Any

import pytest

from drivers.base import DeviceError
from drivers.emulated.i2c import EmulatedDevice, EmulatedSMBus, RegisterFile
from drivers.i2c.bus import AsyncI2CBus, I2CError, open_real_bus

from .conftest import MakeBus


class Recorder(RegisterFile):
    """A register file that records which thread ran each transaction and overlap."""

    def __init__(self, address: int, hold_s: float = 0.0) -> None:
        super().__init__(address)
        self.hold_s = hold_s
        self.threads: set[str] = set()
        self.log: list[int] = []

    in_flight = 0
    max_in_flight = 0
    guard = threading.Lock()

    def transaction(self, msgs: Any) -> list[bytes]:
        cls = Recorder
        with cls.guard:
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            self.threads.add(threading.current_thread().name)
            if self.hold_s:
                time.sleep(self.hold_s)
            return super().transaction(msgs)
        finally:
            with cls.guard:
                cls.in_flight -= 1


async def test_nack_becomes_device_error_naming_bus_address_register(make_bus: MakeBus) -> None:
    bus, _ = make_bus()
    with pytest.raises(DeviceError) as ei:
        await bus.read_block(0x50, 0x10, 2)
    err = ei.value
    assert isinstance(err, I2CError)
    assert err.errno == errno.ENXIO and err.is_nack
    assert (err.bus_id, err.addr, err.reg) == ("emu", 0x50, 0x10)
    text = str(err)
    assert "bus emu" in text and "addr 0x50" in text and "reg 0x10" in text and "ENXIO" in text
    assert bus.stats()["errors"] == 1


async def test_bcm2835_style_eremoteio_is_mapped_too(make_bus: MakeBus) -> None:
    bus, _ = make_bus(nack_errno=errno.EREMOTEIO)
    with pytest.raises(I2CError) as ei:
        await bus.write_byte(0x22, 0x01, 0xFF)
    assert ei.value.errno == errno.EREMOTEIO and "EREMOTEIO" in str(ei.value)


async def test_injected_nack_then_recovery(make_bus: MakeBus) -> None:
    dev = RegisterFile(0x20)
    bus, _ = make_bus(dev)
    await bus.write_byte(0x20, 0x05, 0xAB)
    dev.inject_nack(2)
    for _ in range(2):
        with pytest.raises(I2CError):
            await bus.read_block(0x20, 0x05, 1)
    assert await bus.read_block(0x20, 0x05, 1) == b"\xab"


async def test_transactions_are_serialised_on_one_worker_thread(make_bus: MakeBus) -> None:
    Recorder.max_in_flight = 0
    a, b = Recorder(0x20, hold_s=0.002), Recorder(0x21, hold_s=0.002)
    bus, _ = make_bus(a, b)

    async def worker(dev: Recorder, i: int) -> None:
        await bus.write_byte(dev.address, i % 256, i % 256)
        assert (await bus.read_block(dev.address, i % 256, 1))[0] == i % 256

    await asyncio.gather(*(worker(a if i % 2 else b, i) for i in range(40)))
    assert Recorder.max_in_flight == 1  # never two transactions on the wire at once
    threads = a.threads | b.threads
    assert len(threads) == 1
    assert threading.current_thread().name not in threads
    assert bus.stats()["transactions"] == 80


async def test_fifo_order_of_submissions(make_bus: MakeBus) -> None:
    dev = RegisterFile(0x20)
    bus, _ = make_bus(dev)
    await asyncio.gather(*(bus.write_byte(0x20, 0, i) for i in range(30)))
    assert [v for _, v in dev.writes] == list(range(30))


async def test_event_loop_not_blocked_by_a_slow_transaction(make_bus: MakeBus) -> None:
    slow = RegisterFile(0x30)
    slow.stall_s = 0.3  # a stretched clock / stuck slave holding the bus 300 ms
    bus, _ = make_bus(slow)
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop:
            t = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - t - 0.005)

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    await bus.read_block(0x30, 0, 4)
    elapsed = time.perf_counter() - t0
    stop = True
    await tick
    assert elapsed >= 0.29
    assert len(lags) >= 10  # the loop kept running while the worker was stuck
    # A blocking call would show one lag of ~300 ms; allow generous scheduling noise.
    assert max(lags) < 0.2


async def test_other_coroutines_progress_while_bus_busy(make_bus: MakeBus) -> None:
    slow = RegisterFile(0x30)
    slow.stall_s = 0.4
    bus, _ = make_bus(slow)
    done: list[float] = []

    async def cpu_side() -> None:
        for _ in range(5):
            await asyncio.sleep(0.01)
            done.append(time.perf_counter())

    t0 = time.perf_counter()
    await asyncio.gather(bus.read_block(0x30, 0, 1), cpu_side())
    assert len(done) == 5 and done[-1] - t0 < 0.3  # 50 ms of sleeps, not after the 400 ms


async def test_opener_runs_lazily_on_the_worker() -> None:
    calls: list[str] = []
    smbus = EmulatedSMBus([RegisterFile(0x20)])

    def opener() -> EmulatedSMBus:
        calls.append(threading.current_thread().name)
        return smbus

    bus = AsyncI2CBus(opener, "7")
    assert calls == []  # constructing the bus touches no adapter
    await bus.read_block(0x20, 0, 1)
    await bus.read_block(0x20, 0, 1)
    assert len(calls) == 1 and calls[0].startswith("i2c-7")
    await bus.close()


async def test_missing_adapter_is_a_device_error_and_retried() -> None:
    attempts = 0
    smbus = EmulatedSMBus([RegisterFile(0x20)])

    def opener() -> EmulatedSMBus:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory: '/dev/i2c-3'")
        return smbus

    bus = AsyncI2CBus(opener, "3")
    with pytest.raises(I2CError) as ei:
        await bus.read_block(0x20, 0, 1)
    assert ei.value.op == "open" and "dtparam=i2c_arm=on" in str(ei.value)
    assert await bus.read_block(0x20, 0, 1) == b"\x00"  # adapter appeared: re-opened
    await bus.close()


class VanishingBus(EmulatedSMBus):
    """Raises ENODEV once, as i2c-dev does when a USB I2C adapter is unplugged."""

    gone = True

    def read_i2c_block_data(self, *a: Any, **k: Any) -> list[int]:
        if self.gone:
            self.gone = False
            raise OSError(errno.ENODEV, "No such device")
        return super().read_i2c_block_data(*a, **k)


async def test_adapter_gone_closes_and_reopens() -> None:
    opened: list[VanishingBus] = []

    def opener() -> VanishingBus:
        b = VanishingBus([RegisterFile(0x20)])
        b.gone = not opened  # only the first adapter instance vanishes
        opened.append(b)
        return b

    bus = AsyncI2CBus(opener, "usb")
    with pytest.raises(I2CError) as ei:
        await bus.read_block(0x20, 0, 1)
    assert ei.value.errno == errno.ENODEV
    assert opened[0].close_count == 1
    await bus.read_block(0x20, 0, 1)
    assert len(opened) == 2
    await bus.close()


async def test_long_reads_and_writes_use_i2c_rdwr(make_bus: MakeBus) -> None:
    dev = RegisterFile(0x20)
    bus, _ = make_bus(dev)
    payload = bytes(range(40))
    await bus.write_block(0x20, 0x10, payload)
    assert await bus.read_block(0x20, 0x10, 40) == payload
    assert await bus.transfer(0x20, b"\x10", 3) == payload[:3]
    assert await bus.transfer(0x20, b"\x12", 2, delay_s=0.001) == payload[2:4]


async def test_closed_bus_refuses(make_bus: MakeBus) -> None:
    bus, smbus = make_bus(RegisterFile(0x20))
    await bus.read_block(0x20, 0, 1)
    await bus.close()
    assert smbus.close_count == 1
    with pytest.raises(I2CError) as ei:
        await bus.read_block(0x20, 0, 1)
    assert ei.value.errno == errno.ESHUTDOWN


async def test_unplug_and_replug(make_bus: MakeBus) -> None:
    dev = RegisterFile(0x20)
    bus, _ = make_bus(dev)
    await bus.write_byte(0x20, 1, 0x55)
    dev.unplug()
    with pytest.raises(I2CError):
        await bus.read_block(0x20, 1, 1)
    dev.replug()
    assert await bus.read_block(0x20, 1, 1) == b"\x00"  # power-on state again


async def test_online_hook_takes_device_off_the_bus(make_bus: MakeBus) -> None:
    up = True
    dev = RegisterFile(0x20, online=lambda t: up)
    bus, _ = make_bus(dev)
    await bus.read_block(0x20, 0, 1)
    up = False
    with pytest.raises(I2CError):
        await bus.read_block(0x20, 0, 1)


def test_open_real_bus_validates_number() -> None:
    with pytest.raises(ValueError):
        open_real_bus(-1)
    bus = open_real_bus(250)  # nothing is opened until the first transaction
    assert bus.bus_id == "250"


async def test_real_bus_absent_here_gives_clear_error() -> None:
    bus = open_real_bus(249)
    with pytest.raises(I2CError) as ei:
        await bus.read_block(0x76, 0xD0, 1)
    assert ei.value.op == "open" and "/dev/i2c-249" in str(ei.value)
    await bus.close()


def test_emulated_smbus_rejects_duplicate_address() -> None:
    smbus = EmulatedSMBus([RegisterFile(0x20)])
    with pytest.raises(ValueError, match="0x20"):
        smbus.attach(RegisterFile(0x20))
    with pytest.raises(ValueError):
        EmulatedDevice(0x80)


def test_emulated_smbus_word_order_matches_smbus() -> None:
    dev = RegisterFile(0x20)
    smbus = EmulatedSMBus([dev])
    smbus.write_word_data(0x20, 0x04, 0x1234)
    assert dev.regs[4:6] == b"\x34\x12"  # SMBus words: low byte first
    assert smbus.read_word_data(0x20, 0x04) == 0x1234
    assert smbus.read_byte_data(0x20, 0x05) == 0x12


async def test_cancelled_waiters_leave_the_queue_clean(make_bus: MakeBus) -> None:
    slow = RegisterFile(0x30)
    slow.stall_s = 0.05
    fast = RegisterFile(0x31)
    bus, _ = make_bus(slow, fast)
    first = asyncio.create_task(bus.read_block(0x30, 0, 1))
    await asyncio.sleep(0.01)  # now on the wire
    queued = asyncio.create_task(bus.write_byte(0x31, 0, 0x77))
    await asyncio.sleep(0)
    queued.cancel()  # the hub's read timeout fired before the job started
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert await first == b"\x00"  # the transaction already running completed
    assert fast.writes == []  # the cancelled one never reached the bus
    assert bus.stats()["queued"] == 0


async def test_read_registers_is_one_job_in_order_and_names_the_failing_register(
    make_bus: MakeBus,
) -> None:
    dev = RegisterFile(0x40)
    dev.regs[0x05:0x07] = b"\x10\x00"
    dev.regs[0x02:0x04] = b"\x5d\xc0"
    bus, _ = make_bus(dev)
    words = await bus.read_registers(0x40, (0x05, 0x02, 0x03), 2)
    assert words == [b"\x10\x00", b"\x5d\xc0", bytes(dev.regs[0x03:0x05])]
    assert bus.stats()["transactions"] == 3

    class FailAt(RegisterFile):
        def transaction(self, msgs: Any) -> list[bytes]:
            if msgs and msgs[0][0] == "w" and msgs[0][1][:1] == b"\x03":
                raise OSError(errno.EREMOTEIO, "Remote I/O error")
            return super().transaction(msgs)

    bus2, _ = make_bus(FailAt(0x41))
    with pytest.raises(I2CError) as ei:
        await bus2.read_registers(0x41, (0x05, 0x02, 0x03, 0x04), 2)
    assert ei.value.reg == 0x03 and ei.value.is_nack and "reg 0x03" in str(ei.value)
