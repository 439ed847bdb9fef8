"""NXP PCA9685 emulator: MODE1/MODE2, PRE_SCALE gated by SLEEP, RESTART, the LED registers.

Theory of operation
-------------------
A register-level slave (drivers/emulated/i2c.py `RegisterDevice`) with the parts of the
datasheet a driver can get wrong:
- the register pointer auto-increments only while MODE1.AI is set (a driver that forgets
  AI writes all four bytes of a block into LEDn_ON_L, as the real part does);
- PRE_SCALE writes are ignored unless MODE1.SLEEP is set (§7.3.5), and counted in
  `ignored_prescale_writes` so a test can assert the sleep/restart sequence was kept;
- clearing SLEEP starts the oscillator; the PWM outputs stay off until RESTART is written
  (when the outputs had been running before sleep) or the LED registers are written;
- writing 1 to RESTART after the oscillator is up clears the bit and resumes the outputs;
  `restarts` counts them;
- `duty(channel)` decodes a channel's ON/OFF registers into the fraction of the period the
  output is on (full-off wins over full-on, §7.3.3), `frequency_hz` decodes PRE_SCALE;
- every register write is recorded in `writes` (tests assert read-only probes wrote
  nothing). A wrong address is NACKed by the emulated bus (no device there).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from drivers.emulated.i2c import Clock, RegisterDevice
from drivers.i2c.pca9685 import (
    FULL_BIT,
    MODE1_AI,
    MODE1_DEFAULT,
    MODE1_RESTART,
    MODE1_SLEEP,
    MODE2_DEFAULT,
    PRE_SCALE_DEFAULT,
    REG_ALL_LED,
    REG_LED0,
    REG_MODE1,
    REG_MODE2,
    REG_PRE_SCALE,
    STEPS,
    frequency_for,
)

__all__ = ["EmulatedPCA9685"]


class EmulatedPCA9685(RegisterDevice):
    part = "pca9685"

    def __init__(
        self,
        address: int = 0x40,
        *,
        clock: Clock = time.monotonic,
        online: Callable[[float], bool] | None = None,
    ) -> None:
        self.writes: list[tuple[int, int]] = []
        self.ignored_prescale_writes = 0
        self.restarts = 0
        super().__init__(address, clock=clock, online=online)

    def power_on_reset(self) -> None:
        super().power_on_reset()
        self.regs[REG_MODE1] = MODE1_DEFAULT
        self.regs[REG_MODE2] = MODE2_DEFAULT
        self.regs[REG_PRE_SCALE] = PRE_SCALE_DEFAULT
        for ch in range(16):  # LEDn_OFF_H full-off at power-on
            self.regs[REG_LED0 + 4 * ch + 3] = FULL_BIT
        self.regs[REG_ALL_LED + 3] = FULL_BIT
        self.running = False  # outputs active (oscillator up and not halted by sleep)
        self._was_running = False

    def next_ptr(self, reg: int) -> int:
        return (reg + 1) & 0xFF if self.regs[REG_MODE1] & MODE1_AI else reg

    def write_reg(self, reg: int, value: int) -> None:
        reg &= 0xFF
        value &= 0xFF
        self.writes.append((reg, value))
        if reg == REG_PRE_SCALE:
            if not self.regs[REG_MODE1] & MODE1_SLEEP:
                self.ignored_prescale_writes += 1
                return
            self.regs[reg] = max(3, value)  # the part clamps to 3
            return
        if reg == REG_MODE1:
            old = self.regs[REG_MODE1]
            sleep = bool(value & MODE1_SLEEP)
            if sleep and not old & MODE1_SLEEP:
                self._was_running = self.running
                self.running = False
            restart_bit = old & MODE1_RESTART
            if not sleep and old & MODE1_SLEEP and self._was_running:
                restart_bit = MODE1_RESTART  # the part flags "restart available"
            if value & MODE1_RESTART and restart_bit and not sleep:
                self.restarts += 1
                self.running = True
                restart_bit = 0
            self.regs[REG_MODE1] = (value & ~MODE1_RESTART & 0xFF) | restart_bit
            return
        super().write_reg(reg, value)
        if REG_LED0 <= reg < REG_LED0 + 64 and not self.regs[REG_MODE1] & MODE1_SLEEP:
            self.running = True

    # -- what a test reads off the "scope" ------------------------------------------------

    @property
    def frequency_hz(self) -> float:
        return frequency_for(self.regs[REG_PRE_SCALE])

    def duty(self, channel: int) -> float:
        """Fraction of the period the output is on (0..1); 0 while the chip sleeps."""
        if self.regs[REG_MODE1] & MODE1_SLEEP or not self.running:
            return 0.0
        b = REG_LED0 + 4 * channel
        on = self.regs[b] | (self.regs[b + 1] & 0x0F) << 8
        off = self.regs[b + 2] | (self.regs[b + 3] & 0x0F) << 8
        if self.regs[b + 3] & FULL_BIT:
            return 0.0
        if self.regs[b + 1] & FULL_BIT:
            return 1.0
        return ((off - on) % STEPS) / STEPS
