"""A kernel PWM channel through sysfs as an actuator (driver name `pwm_sysfs`).

Theory of operation
-------------------
The kernel exposes each PWM controller as `/sys/class/pwm/pwmchipN` (the Pi's
`dtoverlay=pwm` / `pwm-2chan`, the RP1's PWM on a Pi 5, a Jetson's `pwm` nodes, or a
PCA9685 bound to the kernel's own pca9685-pwm driver). A channel is used by:
1. writing its number to `pwmchipN/export`, after which the kernel creates
   `pwmchipN/pwmM/` (udev may take a moment to make its files writable by our group,
   so `open()` waits for them, up to `export_timeout_ms`); an already exported channel
   (EBUSY on export) is fine;
2. writing `period` in ns, then `duty_cycle` in ns (the kernel refuses a duty above the
   period, so when the new period is shorter than the current duty the duty is zeroed
   first), `polarity` (`normal`/`inversed`, only while disabled, and only if the
   controller supports it), then `enable` = 1.
`write(value)` writes `duty_cycle = round(clamp(value, 0, 1) * period)` (a clamp is
counted). `close()` writes the safe value and, with `disable_on_close`, `enable` = 0;
the channel stays exported (another process unexporting a channel under us is worse
than leaving it).

The arithmetic (`duty_ns`, `period_ns`) is pure. Each sysfs write is a syscall into the
PWM driver, which for an I2C-attached controller is an I2C transaction, so every write
runs in a thread, one at a time per channel (a lock keeps the order of writes).
`sysfs_root` is configurable so the tests run against a directory tree shaped like sysfs.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Literal

from drivers.base import ActuatorConfig, DeviceError, Resources
from drivers.registry import ActuatorSpec

__all__ = ["ACTUATOR", "PwmSysfs", "PwmSysfsConfig", "duty_ns", "period_ns"]

PWM_ROOT = "/sys/class/pwm"


def period_ns(frequency_hz: float) -> int:
    return round(1e9 / frequency_hz)


def duty_ns(value: float, period: int) -> tuple[int, bool]:
    """0..1 -> (duty_cycle in ns, was the value clamped?)."""
    clamped = not 0.0 <= value <= 1.0
    return round(min(1.0, max(0.0, value)) * period), clamped


class PwmSysfsConfig(ActuatorConfig, tag="pwm_sysfs"):
    """```yaml
    actuator:
      driver: pwm_sysfs
      chip: 0                 # /sys/class/pwm/pwmchip0
      channel: 0              # pwm0 (Pi: GPIO18 = PWM0 channel 0 with dtoverlay=pwm)
      frequency_hz: 1000      # or period_ns: 1000000
      polarity: normal        # normal | inversed (if the controller supports it)
      disable_on_close: false # leave the output running at safe_value on shutdown
      safe_value: 0.0         # duty 0..1 applied at start, on shutdown and on fault
      sysfs_root: /sys/class/pwm
    ```"""

    chip: int = 0
    channel: int = 0
    frequency_hz: float | None = 1000.0
    period_ns: int | None = None
    polarity: Literal["normal", "inversed"] = "normal"
    disable_on_close: bool = False
    export_timeout_ms: int = 2000
    sysfs_root: str = PWM_ROOT

    def __post_init__(self) -> None:
        if self.chip < 0 or self.channel < 0:
            raise ValueError("chip and channel: expected >= 0")
        if self.period_ns is None:
            if self.frequency_hz is None or not 0 < self.frequency_hz <= 1e9:
                raise ValueError(f"frequency_hz: expected 0 < f <= 1e9, got {self.frequency_hz}")
        elif self.period_ns <= 0:
            raise ValueError(f"period_ns: expected > 0, got {self.period_ns}")

    @property
    def period(self) -> int:
        if self.period_ns is not None:
            return self.period_ns
        assert self.frequency_hz is not None
        return period_ns(self.frequency_hz)

    def target(self) -> str:
        return f"pwmchip{self.chip}/pwm{self.channel}"


class PwmSysfs:
    def __init__(self, cfg: PwmSysfsConfig) -> None:
        self.cfg = cfg
        self.period = cfg.period
        self.chip_dir = os.path.join(cfg.sysfs_root, f"pwmchip{cfg.chip}")
        self.dir = os.path.join(self.chip_dir, f"pwm{cfg.channel}")
        self.counters = {"writes": 0, "clamped": 0, "errors": 0}
        self.last_duty_ns: int | None = None
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return f"pwm {self.dir}"

    def _put(self, name: str, value: str, base: str | None = None) -> None:
        path = os.path.join(base or self.dir, name)
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(value)
        except OSError as exc:
            raise DeviceError(
                f"{self.where}: writing {value!r} to {name}: {exc.strerror or exc}"
            ) from None

    def _get(self, name: str) -> str:
        try:
            with open(os.path.join(self.dir, name), encoding="ascii") as f:
                return f.read().strip()
        except OSError as exc:
            raise DeviceError(f"{self.where}: reading {name}: {exc.strerror or exc}") from None

    def _export(self) -> None:
        if not os.path.isdir(self.chip_dir):
            have = sorted(n for n in _listdir(self.cfg.sysfs_root) if n.startswith("pwmchip"))
            raise DeviceError(
                f"pwm: no {self.chip_dir} (overlay loaded? found: {', '.join(have) or 'none'})"
            )
        if not os.path.isdir(self.dir):
            try:
                self._put("export", str(self.cfg.channel), base=self.chip_dir)
            except DeviceError:
                if not os.path.isdir(self.dir):  # EBUSY when exported meanwhile is fine
                    raise
        deadline = time.monotonic() + self.cfg.export_timeout_ms / 1000.0
        # the kernel creates pwmM/ at once; udev's chgrp/chmod of its files follows
        while not os.access(os.path.join(self.dir, "duty_cycle"), os.W_OK):
            if time.monotonic() > deadline:
                raise DeviceError(
                    f"{self.where}: not writable {self.cfg.export_timeout_ms} ms after export "
                    "(udev rule for the pwm group missing?)"
                )
            time.sleep(0.01)

    def _open_sync(self) -> None:
        self._export()
        duty, _ = duty_ns(self.cfg.safe_value, self.period)
        current_duty = int(self._get("duty_cycle") or 0)
        if current_duty > self.period:
            self._put("duty_cycle", "0")  # the kernel refuses a period below the duty
        self._put("period", str(self.period))
        self._put("duty_cycle", str(duty))
        if self._get("polarity") not in ("", self.cfg.polarity):
            self._put("enable", "0")  # polarity changes only while disabled
            self._put("polarity", self.cfg.polarity)
        self._put("enable", "1")
        self.last_duty_ns = duty

    async def open(self) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(self._open_sync)
            except DeviceError:
                self.counters["errors"] += 1
                raise

    async def write(self, value: float) -> None:
        duty, clamped = duty_ns(value, self.period)
        if clamped:
            self.counters["clamped"] += 1
        async with self._lock:
            try:
                await asyncio.to_thread(self._put, "duty_cycle", str(duty))
            except DeviceError:
                self.counters["errors"] += 1
                raise
        self.counters["writes"] += 1
        self.last_duty_ns = duty

    async def close(self) -> None:
        await self.write(self.cfg.safe_value)
        if self.cfg.disable_on_close:
            async with self._lock:
                await asyncio.to_thread(self._put, "enable", "0")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _factory(cfg: Any, resources: Resources) -> PwmSysfs:
    return PwmSysfs(cfg)


ACTUATOR = ActuatorSpec(
    name="pwm_sysfs",
    config_type=PwmSysfsConfig,
    factory=_factory,
    summary="one kernel PWM channel through /sys/class/pwm (duty 0..1)",
)
