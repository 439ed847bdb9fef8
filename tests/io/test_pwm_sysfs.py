"""Kernel PWM through sysfs, against a directory tree shaped like /sys/class/pwm.

The fake kernel here is a task that watches `export` the way the PWM core reacts to it
(creating pwmN/ with its attribute files), and a check of the order rule the kernel
enforces (duty_cycle <= period) on every state the files pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from drivers.errors import DeviceError
from drivers.pwm_sysfs import PwmSysfs, PwmSysfsConfig, duty_ns, period_ns
from drivers.registry import actuator_drivers
from tests.i2c.helpers import cfg


def make_chip(root: Path, chip: int = 0, npwm: int = 2) -> Path:
    d = root / f"pwmchip{chip}"
    d.mkdir(parents=True)
    (d / "npwm").write_text(f"{npwm}\n")
    (d / "export").write_text("")
    (d / "unexport").write_text("")
    return d


def make_channel(chip_dir: Path, ch: int) -> Path:
    p = chip_dir / f"pwm{ch}"
    p.mkdir()
    for name, v in (("period", "0"), ("duty_cycle", "0"), ("enable", "0"), ("polarity", "normal")):
        (p / name).write_text(v + "\n")
    return p


@contextlib.asynccontextmanager
async def fake_pwm_core(chip_dir: Path) -> AsyncIterator[list[str]]:
    """Creates pwmN/ when N is written to export (as the kernel would); yields the exports."""
    exports: list[str] = []

    async def watch() -> None:
        while True:
            text = (chip_dir / "export").read_text().strip()
            if text and text not in exports:
                exports.append(text)
                make_channel(chip_dir, int(text))
                (chip_dir / "export").write_text("")
            await asyncio.sleep(0.005)

    task = asyncio.create_task(watch())
    try:
        yield exports
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_arithmetic_and_config() -> None:
    assert period_ns(1000) == 1_000_000 and period_ns(25_000) == 40_000
    assert duty_ns(0.25, 40_000) == (10_000, False)
    assert duty_ns(1.5, 40_000) == (40_000, True) and duty_ns(-1, 40_000) == (0, True)
    c = cfg(PwmSysfsConfig, chip=2, channel=1, period_ns=20_000_000)
    assert c.period == 20_000_000 and c.target() == "pwmchip2/pwm1"
    assert actuator_drivers()["pwm_sysfs"].config_type is PwmSysfsConfig
    with pytest.raises(msgspec.ValidationError):
        cfg(PwmSysfsConfig, frequency_hz=0)


async def test_export_configure_write_close(tmp_path: Path) -> None:
    chip = make_chip(tmp_path)
    c = cfg(
        PwmSysfsConfig, channel=1, frequency_hz=25_000, safe_value=0.2, sysfs_root=str(tmp_path)
    )
    a = PwmSysfs(c)
    async with fake_pwm_core(chip) as exports:
        await a.open()
    assert exports == ["1"]
    ch = chip / "pwm1"
    assert (ch / "period").read_text() == "40000"
    assert (ch / "duty_cycle").read_text() == "8000"  # the safe value
    assert (ch / "enable").read_text() == "1"
    await a.write(0.5)
    assert (ch / "duty_cycle").read_text() == "20000"
    await a.write(7.0)
    assert (ch / "duty_cycle").read_text() == "40000" and a.counters["clamped"] == 1
    await a.close()
    assert (ch / "duty_cycle").read_text() == "8000"
    assert (ch / "enable").read_text() == "1"  # disable_on_close is off by default


async def test_already_exported_shorter_period_and_polarity(tmp_path: Path) -> None:
    chip = make_chip(tmp_path)
    ch = make_channel(chip, 0)
    (ch / "period").write_text("10000000")
    (ch / "duty_cycle").write_text("5000000")  # above the new period: must go first
    c = cfg(
        PwmSysfsConfig,
        frequency_hz=1000,
        polarity="inversed",
        disable_on_close=True,
        sysfs_root=str(tmp_path),
    )
    a = PwmSysfs(c)
    await a.open()  # no export: the channel is there
    assert (chip / "export").read_text() == ""
    assert (ch / "period").read_text() == "1000000"
    assert int((ch / "duty_cycle").read_text()) <= 1_000_000
    assert (ch / "polarity").read_text() == "inversed"
    await a.close()
    assert (ch / "enable").read_text() == "0"


async def test_missing_chip_and_channel_are_device_errors(tmp_path: Path) -> None:
    make_chip(tmp_path, chip=1)
    with pytest.raises(DeviceError, match=r"no .*pwmchip0 .*found: pwmchip1"):
        await PwmSysfs(cfg(PwmSysfsConfig, sysfs_root=str(tmp_path))).open()
    # export written but nothing appears (no kernel here): bounded wait, then an error
    a = PwmSysfs(cfg(PwmSysfsConfig, chip=1, export_timeout_ms=100, sysfs_root=str(tmp_path)))
    with pytest.raises(DeviceError, match="not writable 100 ms after export"):
        await a.open()
