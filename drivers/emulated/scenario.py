"""The simulated plant: one seeded generator of every physical signal the emulators read.

Theory of operation
-------------------
A `Scenario` describes a small industrial site as *pure functions of time*: a motor with
bearing vibration (seen by an MPU-6050 on its housing), a control cabinet (temperature,
humidity, pressure seen by a BME280), a battery pack (voltage and current seen by an
INA219), and a GPS receiver moving along a slow loop. `t` is seconds since the scenario
started; every method takes an array of times and returns the signal at those times.

Why pure functions of time rather than a stepping simulator: the emulated devices are read
at irregular instants by independent tasks (a 200 Hz IMU poll, a 1 Hz BME280 poll, a
streaming GPS), and tests, the model build and the emulators must all see *the same* plant.
With `signal = f(seed, t)`, reading one sample at a time at 200 Hz gives exactly the
values a single vectorised call over the same times gives, whatever the call pattern.

Randomness without state: noise is drawn from a counter-based hash (SplitMix64 finaliser)
of (seed, stream, grid index), where the grid index is `t` rounded to a fixed 1 kHz grid
(`NOISE_GRID_HZ`). This is white, Gaussian (Box-Muller) noise, sample-and-hold at 1 kHz,
so any read rate up to 1 kHz sees independent samples. Slow "random" structure (battery
load steps, satellite counts) uses the same hash on coarser grids. Deterministic phases
and frequencies of the slow sinusoids come from `numpy.random.default_rng(seed)` at
construction. Nothing here does I/O or keeps mutable state apart from the anomaly list.

Physics, briefly (values are plausible, not calibrated against one real machine):

- Motor: 6-pole induction motor on 50 Hz, 985 rpm at the nominal load (shaft ~16.4 Hz),
  slip growing with load so the shaft rate wanders slightly. The shaft phase is the
  closed-form integral of the instantaneous rate, so it is exact at any `t`. Radial
  vibration (x, y) carries 1x (unbalance) and 2x (misalignment) tones; the axial z axis
  carries gravity (1 g) and a weaker 1x. Sensor noise ~6 mg rms per axis.
- `bearing_wear`: outer- and inner-race defect tones (BPFO = 3.57x, BPFI = 5.43x shaft,
  both below the 100 Hz Nyquist of a 200 Hz IMU), amplitude-modulated at the shaft rate
  (the defect passes through the load zone once a turn), and raised broadband noise (the
  rough race). All scale with `severity`. The gyroscope sees the same tones, weaker.
- Motor current: follows the mechanical load (magnetising current + a load term).
- Cabinet temperature: daily swing peaking mid-afternoon, an HVAC cycle of ~30 min, heat
  from the motor load, sensor noise. `overheat` adds a trapezoid (ramp up, plateau, ramp
  down, all inside the anomaly window) of `15 degC x severity`. Relative humidity is
  derived from a slowly varying dew point and the cabinet temperature, so it falls when
  the cabinet overheats (as it physically would).
- Battery: 4S LiFePO4 pack; open-circuit voltage with a daily solar charge swing, load
  current stepping between levels every 10 s, internal resistance 25 mOhm. `voltage_sag`
  (a weak cell) drops the voltage by `(1.0 V + 40 mOhm x I) x severity`.
- GPS: a 150 m radius loop around a base point in 15 minutes, metre-level jitter.
- `dropout`: changes no signal; `is_dropout(sensor, t)` tells the emulated device named
  by `Anomaly.sensor` (or every device when it is None) to stop answering.
- `nack_storm`: changes no signal; `is_nacked(sensor, t)` makes an I2C device named by
  `Anomaly.sensor` (None: every device) NACK a `severity` fraction (0..1) of its
  transactions, chosen by a hash of (seed, device, millisecond): seeded and reproducible,
  a flaky connector or a marginal pull-up rather than an unplugged part.

Drifts (a healthy plant, or a sensor, that changed; for the learning work, docs/learning.md):
- `gain_drift`: the accelerometer's gain becomes `1 + 0.4 x severity` (every axis,
  gravity included): a step at `start_s`.
- `resonance_shift`: a new mounting moves the housing resonance from near 1x to near 2x:
  the 1x tones shrink by `0.3 x severity` (capped), the 2x tones grow by `1.5 x severity`.
- `ambient_rise`: a warmer season, `+8 degC x severity` on the cabinet, ramped in over
  30 minutes (humidity follows).
- `load_profile`: a new process load, mean load `+0.12 x severity`: unbalance amplitude,
  motor current and motor heat follow; the drive holds the shaft speed (the slip of the
  base load), so the shaft phase is unchanged outside the window.
- `slow_bearing`: a slow-onset bearing fault: the `bearing_wear` signature with severity
  ramping linearly from 0 to `severity` over 30 minutes, then holding.

`AFFECTS` lists, per anomaly kind, the signal methods it changes; the tests check that
the other signals are bit-for-bit unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

__all__ = [
    "AFFECTS",
    "ANOMALY_KINDS",
    "DRIFT_KINDS",
    "NOISE_GRID_HZ",
    "Anomaly",
    "AnomalyKind",
    "GpsFix",
    "Scenario",
]

AnomalyKind = Literal[
    "bearing_wear",
    "overheat",
    "voltage_sag",
    "dropout",
    "gain_drift",
    "resonance_shift",
    "ambient_rise",
    "load_profile",
    "slow_bearing",
    "nack_storm",
]
ANOMALY_KINDS: tuple[AnomalyKind, ...] = get_args(AnomalyKind)
# The drifts (a healthy plant or sensor that changed) among them, for the learning tests.
DRIFT_KINDS: tuple[AnomalyKind, ...] = (
    "gain_drift",
    "resonance_shift",
    "ambient_rise",
    "load_profile",
)

# Which signal methods each anomaly kind changes (all others are untouched).
AFFECTS: dict[str, frozenset[str]] = {
    "bearing_wear": frozenset({"vibration_g", "angular_rate_dps"}),
    "overheat": frozenset({"cabinet_temp_c", "humidity_pct"}),
    "voltage_sag": frozenset({"battery_v"}),
    "dropout": frozenset(),
    "gain_drift": frozenset({"vibration_g"}),
    "resonance_shift": frozenset({"vibration_g"}),
    "ambient_rise": frozenset({"cabinet_temp_c", "humidity_pct"}),
    "load_profile": frozenset(
        {
            "vibration_g",
            "motor_current_a",
            "cabinet_temp_c",
            "humidity_pct",
        }
    ),
    "slow_bearing": frozenset({"vibration_g", "angular_rate_dps"}),
    "nack_storm": frozenset(),
}

NOISE_GRID_HZ = 1000.0

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike

# Motor and bearing geometry.
_LINE_HZ = 50.0
_POLE_PAIRS = 3
_SYNC_HZ = _LINE_HZ / _POLE_PAIRS  # 16.67 Hz synchronous speed
_SLIP_PER_LOAD = 0.015 / 0.7  # 1.5 % slip at the nominal 0.7 load -> 16.42 Hz
_BPFO = 3.57
_BPFI = 5.43
_OVERHEAT_C = 15.0
_OVERHEAT_RAMP_S = 300.0
_GAIN_PER_SEV = 0.4  # gain_drift: the accelerometer reads (1 + 0.4 x severity) x the truth
_AMBIENT_C = 8.0  # ambient_rise: +8 degC x severity, ramped in over _AMBIENT_RAMP_S
_AMBIENT_RAMP_S = 1800.0
_LOAD_STEP = 0.12  # load_profile: mean load +0.12 x severity, in the drift window
_SLOW_RAMP_S = 1800.0  # slow_bearing: severity ramps 0 -> severity over 30 min, then holds
_BASE_LAT = 52.5200
_BASE_LON = 13.4050
_EARTH_R_M = 6_371_000.0

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def _splitmix_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _name_key(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") << 20


@dataclass(frozen=True)
class Anomaly:
    """A fault injected into the plant during `[start_s, start_s + duration_s)`."""

    kind: AnomalyKind
    start_s: float
    duration_s: float
    severity: float = 1.0
    sensor: str | None = None  # for "dropout": which emulated device goes silent (None: all)

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"anomaly kind must be one of {ANOMALY_KINDS}, got {self.kind!r}")
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"anomaly duration_s must be > 0 and finite, got {self.duration_s}")
        if not math.isfinite(self.start_s):
            raise ValueError(f"anomaly start_s must be finite, got {self.start_s}")
        if not (self.severity >= 0 and math.isfinite(self.severity)):
            raise ValueError(f"anomaly severity must be >= 0, got {self.severity}")

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.end_s


@dataclass(frozen=True)
class GpsFix:
    lat_deg: float
    lon_deg: float
    alt_m: float
    speed_kn: float
    course_deg: float
    fix_quality: int  # NMEA GGA: 0 invalid, 1 GPS fix
    satellites: int
    utc: datetime
    hdop: float = 0.9


class Scenario:
    """Deterministic plant signals from a seed (see the module docstring)."""

    def __init__(
        self,
        seed: int = 42,
        anomalies: Sequence[Anomaly] = (),
        *,
        start_utc: datetime | None = None,
    ) -> None:
        self.seed = int(seed)
        self.start_utc = start_utc or datetime(2026, 6, 1, 8, 0, 0, tzinfo=UTC)
        # Snapshot-replaced tuple: readers on other threads never see a half-updated list.
        self._anomalies: tuple[Anomaly, ...] = tuple(anomalies)
        rng = np.random.default_rng(self.seed)
        ph = rng.uniform(0.0, 2.0 * np.pi, size=16)
        self._ph: tuple[float, ...] = tuple(float(x) for x in ph)
        # Mechanical load: 0.7 nominal, two slow sinusoids (process demand).
        self._load_terms = (
            (0.12, 60.0 + 30.0 * float(rng.random()), float(ph[0])),
            (0.08, 420.0 + 200.0 * float(rng.random()), float(ph[1])),
        )
        # Seconds into the day at t = 0, for the daily temperature swing.
        midnight = self.start_utc.replace(hour=0, minute=0, second=0, microsecond=0)
        self._tod0 = (self.start_utc - midnight).total_seconds()
        self._hvac_period = 1500.0 + 600.0 * float(rng.random())
        self._weather_period = 86400.0 * (2.5 + float(rng.random()))
        streams = (
            "ax",
            "ay",
            "az",
            "gx",
            "gy",
            "gz",
            "bx",
            "by",
            "bz",
            "cur",
            "temp",
            "hum",
            "pres",
            "bv",
            "ba",
            "steps",
            "sats",
            "glat",
            "glon",
            "galt",
        )
        # One 64-bit key per (noise stream, sub-stream); numpy's uint64 arithmetic wraps,
        # which is exactly the modular arithmetic the hash wants.
        self._key_u64: dict[tuple[str, int], int] = {
            (name, sub): _splitmix_int(_splitmix_int(self.seed * 1_000_003 + i) + sub)
            for i, name in enumerate(streams)
            for sub in (0, 1)
        }
        self._key_arrays: dict[tuple[tuple[str, ...], tuple[int, ...]], npt.NDArray[np.uint64]] = {}

    # -- anomalies -------------------------------------------------------------------

    @property
    def anomalies(self) -> tuple[Anomaly, ...]:
        return self._anomalies

    def add_anomaly(self, a: Anomaly) -> None:
        """Inject an anomaly at run time (simulate mode, tests)."""
        self._anomalies = (*self._anomalies, a)

    def active_anomalies(self, t: float) -> list[Anomaly]:
        return [a for a in self._anomalies if a.active(t)]

    def is_nacked(self, sensor: str, t: float) -> bool:
        for a in self._anomalies:
            if a.kind == "nack_storm" and (a.sensor is None or a.sensor == sensor) and a.active(t):
                h = _splitmix_int(self.seed * 1_000_033 + _name_key(sensor) + int(t * 1000.0))
                return (h & 0xFFFF) < min(1.0, a.severity) * 0x10000
        return False

    def is_dropout(self, sensor: str, t: float) -> bool:
        return any(
            a.kind == "dropout" and (a.sensor is None or a.sensor == sensor) and a.active(t)
            for a in self._anomalies
        )

    def _envelope(self, kind: str, t: FloatArray, ramp_s: float = 0.0) -> FloatArray | None:
        """Sum of severities of the `kind` anomalies active at each t (None: none at all).
        With `ramp_s`, each severity ramps in linearly over its first `ramp_s` seconds."""
        env: FloatArray | None = None
        for a in self._anomalies:
            if a.kind != kind:
                continue
            on = (t >= a.start_s) & (t < a.end_s)
            if not on.any():
                continue
            sev: FloatArray | float = a.severity
            if ramp_s > 0.0:
                sev = a.severity * np.clip((t - a.start_s) / ramp_s, 0.0, 1.0)
            part = np.where(on, sev, 0.0)
            env = part if env is None else env + part
        return env

    def _bearing_envelope(self, t: FloatArray) -> FloatArray | None:
        env = self._envelope("bearing_wear", t)
        slow = self._envelope("slow_bearing", t, ramp_s=_SLOW_RAMP_S)
        if slow is None:
            return env
        return slow if env is None else env + slow

    # -- noise -----------------------------------------------------------------------

    def _keys(self, streams: tuple[str, ...], subs: tuple[int, ...]) -> npt.NDArray[np.uint64]:
        keys = self._key_arrays.get((streams, subs))
        if keys is None:
            keys = np.array(
                [self._key_u64[(s, sub)] for sub in subs for s in streams], dtype=np.uint64
            )
            self._key_arrays[(streams, subs)] = keys
        return keys

    def _uniform(
        self, streams: tuple[str, ...], idx: npt.NDArray[np.int64], subs: tuple[int, ...] = (0,)
    ) -> FloatArray:
        """(n, len(subs) * k) uniform [0, 1) from a SplitMix64 hash of (seed, stream, sub, idx).

        All streams are hashed in one broadcast pass: at one sample per call (an emulated
        read) the cost is the number of numpy operations, not their size."""
        x = idx.astype(np.uint64)[:, None] * _GOLDEN + self._keys(streams, subs)[None, :]
        x = (x ^ (x >> _S30)) * _MIX1
        x = (x ^ (x >> _S27)) * _MIX2
        x = x ^ (x >> _S31)
        return (x >> _S11).astype(np.float64) * (1.0 / 9007199254740992.0)

    def _gauss(
        self, streams: tuple[str, ...], t: FloatArray, rate_hz: float = NOISE_GRID_HZ
    ) -> FloatArray:
        """(n, k) standard normal noise (Box-Muller), sample-and-hold on a `rate_hz` grid."""
        idx = np.rint(t * rate_hz).astype(np.int64)
        k = len(streams)
        u = self._uniform(streams, idx, (0, 1))
        u1 = 1.0 - u[:, :k]  # (0, 1]: the log is finite
        return np.sqrt(-2.0 * np.log(u1)) * np.cos((2.0 * np.pi) * u[:, k:])

    # -- motor -----------------------------------------------------------------------

    @staticmethod
    def _t(t: ArrayLike) -> FloatArray:
        arr = np.atleast_1d(np.asarray(t, dtype=np.float64))
        if arr.ndim != 1:
            raise ValueError(f"t must be a scalar or a 1-D array of seconds, got shape {arr.shape}")
        return arr

    def motor_load(self, t: ArrayLike) -> FloatArray:
        """Mechanical load of the motor, fraction of rated (about 0.5 to 0.9)."""
        tt = self._t(t)
        out = np.full_like(tt, 0.7)
        for amp, period, phase in self._load_terms:
            out += amp * np.sin(2.0 * np.pi * tt / period + phase)
        step = self._envelope("load_profile", tt)
        if step is not None:
            out = out + _LOAD_STEP * step
        return out

    def _load_integral(self, t: FloatArray) -> FloatArray:
        out = 0.7 * t
        for amp, period, phase in self._load_terms:
            w = 2.0 * np.pi / period
            out += amp / w * (np.cos(phase) - np.cos(w * t + phase))
        return out

    def shaft_hz(self, t: ArrayLike) -> FloatArray:
        tt = self._t(t)
        out = _SYNC_HZ * (1.0 - _SLIP_PER_LOAD * self.motor_load(tt))
        step = self._envelope("load_profile", tt)
        if step is not None:  # the drive holds the speed through a load_profile step
            out = out + _SYNC_HZ * _SLIP_PER_LOAD * _LOAD_STEP * step
        return out

    def _shaft_phase(self, t: FloatArray) -> FloatArray:
        """Shaft angle in radians: 2*pi times the integral of the shaft rate."""
        return 2.0 * np.pi * _SYNC_HZ * (t - _SLIP_PER_LOAD * self._load_integral(t))

    def vibration_g(self, t: ArrayLike) -> FloatArray:
        """(n, 3) housing acceleration in g: x, y radial, z axial with gravity (+1 g)."""
        tt = self._t(t)
        ph = self._ph
        th = self._shaft_phase(tt)
        load = self.motor_load(tt)
        a1 = 0.040 * (0.8 + 0.4 * load)  # unbalance grows a little with load
        a2: FloatArray | float = 0.015
        res = self._envelope("resonance_shift", tt)
        if res is not None:  # a new mounting: its resonance now sits near 2x, not 1x
            a1 = a1 * (1.0 - 0.3 * np.minimum(res, 2.0))
            a2 = 0.015 * (1.0 + 1.5 * res)
        out = np.empty((tt.size, 3), dtype=np.float64)
        out[:, 0] = a1 * np.sin(th + ph[2]) + a2 * np.sin(2.0 * th + ph[3])
        out[:, 1] = a1 * np.cos(th + ph[2]) + a2 * 0.8 * np.sin(2.0 * th + ph[4])
        out[:, 2] = 1.0 + 0.3 * a1 * np.sin(th + ph[5]) + 0.5 * a2 * np.sin(2.0 * th + ph[6])
        out += 0.006 * self._gauss(("ax", "ay", "az"), tt)
        sev = self._bearing_envelope(tt)
        if sev is not None:
            out += self._bearing(tt, th, sev, scale=1.0)
        gain = self._envelope("gain_drift", tt)
        if gain is not None:  # the sensor, not the plant: everything it reads scales
            out *= (1.0 + _GAIN_PER_SEV * gain)[:, None]
        return out

    def _bearing(self, t: FloatArray, th: FloatArray, sev: FloatArray, scale: float) -> FloatArray:
        """(n, 3) bearing-defect contribution (tones + raised broadband noise)."""
        ph = self._ph
        am = 1.0 + 0.6 * np.cos(th + ph[7])  # once-per-turn pass through the load zone
        bpfo = 0.030 * am * np.sin(_BPFO * th + ph[8])
        bpfi = 0.022 * am * np.sin(_BPFI * th + ph[9])
        out = np.empty((t.size, 3), dtype=np.float64)
        noise = self._gauss(("bx", "by", "bz"), t)
        out[:, 0] = bpfo + bpfi + 0.015 * noise[:, 0]
        out[:, 1] = 0.8 * bpfo - 0.6 * bpfi + 0.015 * noise[:, 1]
        out[:, 2] = 0.4 * bpfo + 0.3 * bpfi + 0.010 * noise[:, 2]
        return out * (scale * sev)[:, None]

    def angular_rate_dps(self, t: ArrayLike) -> FloatArray:
        """(n, 3) housing angular rate in deg/s (rocking at 1x, gyro noise ~0.05 dps)."""
        tt = self._t(t)
        ph = self._ph
        th = self._shaft_phase(tt)
        out = np.empty((tt.size, 3), dtype=np.float64)
        out[:, 0] = 0.30 * np.sin(th + ph[10])
        out[:, 1] = 0.25 * np.cos(th + ph[10])
        out[:, 2] = 0.10 * np.sin(2.0 * th + ph[11])
        out += 0.05 * self._gauss(("gx", "gy", "gz"), tt)
        sev = self._bearing_envelope(tt)
        if sev is not None:
            out += self._bearing(tt, th, sev, scale=8.0)  # g -> dps order of magnitude
        return out

    def motor_current_a(self, t: ArrayLike) -> FloatArray:
        """(n,) motor phase current in A: magnetising current + load term + noise."""
        tt = self._t(t)
        return 1.8 + 3.0 * self.motor_load(tt) + 0.03 * self._gauss(("cur",), tt)[:, 0]

    # -- cabinet ---------------------------------------------------------------------

    def _cabinet_base_c(self, t: FloatArray) -> FloatArray:
        tod = self._tod0 + t
        daily = 5.0 * np.sin(2.0 * np.pi * (tod - 9.0 * 3600.0) / 86400.0)  # peak ~15:00
        hvac = 0.8 * np.sin(2.0 * np.pi * t / self._hvac_period + self._ph[12])
        motor_heat = 2.0 * (self.motor_load(t) - 0.7)
        out = 28.0 + daily + hvac + motor_heat
        season = self._envelope("ambient_rise", t, ramp_s=_AMBIENT_RAMP_S)
        if season is not None:
            out = out + _AMBIENT_C * season
        return out

    def _overheat_c(self, t: FloatArray) -> FloatArray | None:
        out: FloatArray | None = None
        for a in self._anomalies:
            if a.kind != "overheat":
                continue
            on = (t >= a.start_s) & (t < a.end_s)
            if not on.any():
                continue
            ramp = min(_OVERHEAT_RAMP_S, 0.3 * a.duration_s)
            up = np.clip((t - a.start_s) / ramp, 0.0, 1.0)
            down = np.clip((a.end_s - t) / ramp, 0.0, 1.0)
            part = np.where(on, _OVERHEAT_C * a.severity * np.minimum(up, down), 0.0)
            out = part if out is None else out + part
        return out

    def cabinet_temp_c(self, t: ArrayLike) -> FloatArray:
        """(n,) cabinet air temperature in degC."""
        tt = self._t(t)
        out = self._cabinet_base_c(tt) + 0.02 * self._gauss(("temp",), tt)[:, 0]
        extra = self._overheat_c(tt)
        if extra is not None:
            out = out + extra
        return out

    def humidity_pct(self, t: ArrayLike) -> FloatArray:
        """(n,) relative humidity in %, from a slowly varying dew point (Magnus formula)."""
        tt = self._t(t)
        temp = self._cabinet_base_c(tt)
        extra = self._overheat_c(tt)
        if extra is not None:
            temp = temp + extra
        dew = 12.0 + 2.0 * np.sin(2.0 * np.pi * tt / self._weather_period + self._ph[13])
        b, c = 17.625, 243.04
        rh = 100.0 * np.exp(b * dew / (c + dew) - b * temp / (c + temp))
        return np.clip(rh + 0.1 * self._gauss(("hum",), tt)[:, 0], 0.0, 100.0)

    def pressure_pa(self, t: ArrayLike) -> FloatArray:
        """(n,) barometric pressure in Pa: weather systems + semi-diurnal tide + noise."""
        tt = self._t(t)
        weather = 600.0 * np.sin(2.0 * np.pi * tt / self._weather_period + self._ph[14])
        tide = 120.0 * np.sin(2.0 * np.pi * (self._tod0 + tt) / 43200.0)
        return 101325.0 + weather + tide + 3.0 * self._gauss(("pres",), tt)[:, 0]

    # -- battery ---------------------------------------------------------------------

    def battery_a(self, t: ArrayLike) -> FloatArray:
        """(n,) pack discharge current in A (positive = discharge), stepping every 10 s."""
        tt = self._t(t)
        step = np.floor(tt / 10.0).astype(np.int64)
        levels = np.array([1.5, 3.0, 6.0, 10.0, 14.0])
        pick = np.minimum((self._uniform(("steps",), step)[:, 0] * levels.size).astype(np.int64), 4)
        return levels[pick] + 0.02 * self._gauss(("ba",), tt)[:, 0]

    def battery_v(self, t: ArrayLike) -> FloatArray:
        """(n,) pack terminal voltage in V (4S LiFePO4, 25 mOhm internal resistance)."""
        tt = self._t(t)
        current = self.battery_a(tt)
        ocv = 13.25 + 0.15 * np.sin(2.0 * np.pi * (self._tod0 + tt) / 86400.0 + self._ph[15])
        v = ocv - 0.025 * current + 0.005 * self._gauss(("bv",), tt)[:, 0]
        sev = self._envelope("voltage_sag", tt)
        if sev is not None:
            v = v - sev * (1.0 + 0.040 * current)
        return v

    # -- GPS -------------------------------------------------------------------------

    def gps(self, t: float) -> GpsFix:
        """The fix at time t: a 150 m loop around the base point every 15 minutes."""
        radius, period = 150.0, 900.0
        w = 2.0 * np.pi / period
        ang = w * t
        tt = np.array([t], dtype=np.float64)
        jitter = self._gauss(("glat", "glon", "galt"), tt, 1.0)[0]
        north = radius * math.sin(ang) + 0.8 * float(jitter[0])
        east = radius * math.cos(ang) + 0.8 * float(jitter[1])
        lat = _BASE_LAT + math.degrees(north / _EARTH_R_M)
        lon = _BASE_LON + math.degrees(east / (_EARTH_R_M * math.cos(math.radians(_BASE_LAT))))
        speed_ms = radius * w
        # Velocity (d north, d east) = radius*w*(cos, -sin): course clockwise from north.
        course = math.degrees(math.atan2(-math.sin(ang), math.cos(ang))) % 360.0
        sats_u = float(self._uniform(("sats",), np.array([int(t // 60.0)], dtype=np.int64))[0, 0])
        sats = 7 + int(sats_u * 5)
        alt = 34.0 + 0.5 * math.sin(ang) + 0.3 * float(jitter[2])
        return GpsFix(
            lat_deg=lat,
            lon_deg=lon,
            alt_m=alt,
            speed_kn=speed_ms / 0.514444,
            course_deg=course,
            fix_quality=1,
            satellites=sats,
            utc=self.start_utc + timedelta(seconds=float(t)),
            hdop=round(1.6 - 0.1 * sats, 2),
        )
