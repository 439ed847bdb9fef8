"""The soak run's fault schedule: a pure function of (seed, duration).

Theory of operation
-------------------
Faults are drawn in independent *lanes* (network, devices, process, updates, diagnostics),
each a Poisson-like stream with its own seeded `random.Random`, so faults of different
lanes overlap (the broker flaps while a sensor is unplugged, an update lands during a
kill -9) while faults of one lane never fight over the same resource (the link is cut OR
stalled OR throttled). The whole schedule is computed before the run starts: the same seed
and duration give the same list, byte for byte, which is what makes a failing seed
reproducible (the daemon's own timing is not deterministic, the faults it meets are).

Profiles. `short` (the CI profile, and any run under 30 minutes) draws the lanes as above:
kill -9 and restarts every ~4 minutes, so a 5-minute run meets every fault kind. `long`
(the default from 30 minutes on) draws the same lanes from the same seeds, except that the
`power` lane keeps `LONG_POWER_MIN_GAP_S` (30 minutes) between process faults and before
the first one: a daemon process then lives long enough to be judged past its warm-up
(harness.py, `STEADY_AFTER_S`), which a steady-state RSS slope needs. `exclude` drops
fault kinds AFTER drawing, so the faults left are exactly those of the full schedule.

Seed format: `soak1-<int>` (or a bare integer). `parse_seed` accepts both; the report
prints the canonical form to pass back with `SOAK_SEED=`.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

SEED_PREFIX = "soak1-"

# lane -> (mean gap between faults in s, kinds with weights)
LANES: dict[str, tuple[float, list[tuple[str, int]]]] = {
    "network": (
        25.0,
        [
            ("link_cut", 3),
            ("link_stall", 3),
            ("link_throttle", 3),
            ("broker_restart", 2),
            ("spool_fill", 1),
        ],
    ),
    "devices": (20.0, [("serial_vanish", 3), ("i2c_nack_storm", 3)]),
    # kill -9 and restarts on their own slow lane: a leak shows only in a process that
    # lives long enough to fit a slope to, so they are minutes apart, not seconds
    "power": (240.0, [("daemon_kill9", 3), ("daemon_restart", 1)]),
    "process": (
        30.0,
        [
            ("sighup_storm_valid", 2),
            ("sighup_storm_invalid", 2),
            ("tpm_restart", 2),
            ("clock_step", 3),
            ("cpu_stall", 2),
        ],
    ),
    "updates": (40.0, [("update_good", 2), ("update_bad", 3)]),
    "diag": (30.0, [("diag_hang", 1), ("diag_flood", 1)]),
}

# the long profile: at least this long between two kill -9 / restarts, and before the first
LONG_POWER_MIN_GAP_S = 1800.0  # STEADY_AFTER_S (20 min) + 10 min judged (harness.py)
# lane -> minimum gap (s) between its faults and before its first one, per profile
PROFILES: dict[str, dict[str, float]] = {
    "short": {},
    "long": {"power": LONG_POWER_MIN_GAP_S},
}
ALL_KINDS = tuple(k for _gap, kinds in LANES.values() for k, _w in kinds)

SERIAL_SENSORS = ("gps", "power_meter", "drive", "bms")
I2C_SENSORS = ("motor_vib", "cabinet", "cabinet_sht", "battery", "motor_current")
BAD_UPDATES = ("bad_signature", "version_rollback", "truncated", "wrong_key")


@dataclass(frozen=True)
class Fault:
    t: float  # seconds after the run's start
    kind: str
    duration_s: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 3),
            "kind": self.kind,
            "duration_s": self.duration_s,
            **self.params,
        }


def parse_seed(text: str | int) -> int:
    s = str(text).strip()
    if s.startswith(SEED_PREFIX):
        s = s[len(SEED_PREFIX) :]
    return int(s, 0)


def format_seed(seed: int) -> str:
    return f"{SEED_PREFIX}{seed}"


def _params(kind: str, rnd: random.Random) -> tuple[float, dict[str, Any]]:
    """(duration, parameters) of one fault."""
    if kind == "link_cut":
        return rnd.uniform(3, 20), {}
    if kind == "link_stall":
        return rnd.uniform(3, 25), {}
    if kind == "link_throttle":
        return rnd.uniform(10, 40), {"rate_bps": rnd.choice([1000, 2000, 4000, 8000])}
    if kind == "broker_restart":
        return rnd.uniform(1, 10), {}
    if kind == "spool_fill":  # a long outage with a small spool cap: eviction + loss records
        return rnd.uniform(90, 150), {}
    if kind == "serial_vanish":
        return rnd.uniform(2, 15), {"sensor": rnd.choice(SERIAL_SENSORS)}
    if kind == "i2c_nack_storm":
        return rnd.uniform(1, 10), {
            "sensor": rnd.choice(I2C_SENSORS),
            "severity": rnd.choice([0.2, 0.5, 0.9, 1.0]),
        }
    if kind == "daemon_kill9":
        return rnd.uniform(0.5, 3.0), {}  # down time before "systemd" restarts it
    if kind == "daemon_restart":
        return 0.0, {}
    if kind in ("sighup_storm_valid", "sighup_storm_invalid"):
        return 0.0, {"count": rnd.randint(2, 8), "gap_s": rnd.choice([0.0, 0.05, 0.2])}
    if kind == "tpm_restart":
        return rnd.uniform(0.2, 4.0), {"hard": rnd.random() < 0.5}
    if kind == "clock_step":
        return 0.0, {"offset_s": rnd.choice([-7200, -300, -30, 30, 600, 86400])}
    if kind == "cpu_stall":
        return rnd.choice([0.3, 0.6, 1.0]), {}
    if kind == "update_good":
        return 0.0, {}
    if kind == "update_bad":
        return 0.0, {"variant": rnd.choice(BAD_UPDATES)}
    if kind == "diag_hang":
        return rnd.uniform(5, 30), {"clients": rnd.randint(1, 8), "partial": rnd.random() < 0.5}
    if kind == "diag_flood":
        return rnd.uniform(2, 6), {"clients": rnd.randint(1, 3)}
    raise ValueError(kind)


def profile_for(duration_s: float) -> str:
    """The default profile of a run: `long` from 30 minutes on."""
    return "long" if duration_s >= 1800 else "short"


def make_schedule(
    seed: int,
    duration_s: float,
    warmup_s: float = 20.0,
    *,
    profile: str = "short",
    exclude: Collection[str] = (),
) -> list[Fault]:
    """Every fault of the run, sorted by start time; none starts in the warm-up or in the
    last 15 % of the run (which is kept quiet so the backlog drains before the checks).
    `profile` names the lanes' minimum gaps (PROFILES); `exclude` drops fault kinds."""
    unknown = set(exclude) - set(ALL_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; expected some of {ALL_KINDS}")
    min_gaps: Mapping[str, float] = PROFILES[profile]
    faults: list[Fault] = []
    quiet_from = duration_s * 0.85
    for i, (lane, (mean_gap, kinds)) in enumerate(sorted(LANES.items())):
        rnd = random.Random(seed * 1000 + i)
        names = [k for k, _ in kinds]
        weights = [w for _, w in kinds]
        min_gap = min_gaps.get(lane, 0.0)
        t = max(warmup_s, min_gap) + rnd.uniform(0, mean_gap)
        while t < quiet_from:
            kind = rnd.choices(names, weights)[0]
            dur, params = _params(kind, rnd)
            dur = min(dur, max(0.0, quiet_from - t))
            if kind not in exclude:
                faults.append(Fault(round(t, 3), kind, round(dur, 3), {"lane": lane, **params}))
            t += dur + min_gap + rnd.expovariate(1.0 / mean_gap)
    faults.sort(key=lambda f: (f.t, f.kind))
    return faults
