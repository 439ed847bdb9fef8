"""The soak profiles as tests.

`test_soak_short` is the CI profile: about five minutes of overlapping faults (seed
SOAK_SEED, or soak1-4, whose schedule has every fault kind) against the real peers, and
every invariant of benchmarks/soak/harness.py must hold. Its bounds are generous for a loaded
2-core runner (status within 1 s outside injected stalls and restarts, missed ticks under
25 %, slopes loose enough for five minutes of noise) but each still fails on the fault it
guards.

The pure parts (schedule reproducibility, slope and accounting arithmetic) are tested
here too, so a harness bug cannot turn a broken daemon green.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from benchmarks.soak import invariants as inv
from benchmarks.soak.schedule import format_seed, make_schedule, parse_seed

pytestmark = [pytest.mark.needs_mosquitto, pytest.mark.needs_swtpm]

# soak1-4: its 300 s schedule has every fault kind (soak1-1, the first CI seed, found the
# serial re-open bug: tests/soak/test_regressions.py)
DEFAULT_SEED = "soak1-4"


def test_schedule_is_a_pure_function_of_seed_and_duration() -> None:
    a = [f.to_json() for f in make_schedule(7, 600)]
    b = [f.to_json() for f in make_schedule(7, 600)]
    c = [f.to_json() for f in make_schedule(8, 600)]
    assert a == b and a != c
    kinds = {f["kind"] for f in a}
    assert {"daemon_kill9", "link_stall", "update_bad"} <= kinds
    # the last 15 % stays quiet so the backlog drains before the final checks
    assert all(f["t"] + f["duration_s"] <= 600 * 0.85 + 1e-6 for f in a)
    assert parse_seed(format_seed(12345)) == 12345 and parse_seed("99") == 99


def test_pooled_slope_ignores_restart_resets_but_sees_growth() -> None:
    leak = [[(t, 100 + 0.01 * t) for t in range(0, 600, 5)]]
    assert inv.pooled_slope(leak) == pytest.approx(0.01)
    # two flat processes at different levels: no growth, whatever the level after restart
    flat = [[(t, 100.0) for t in range(0, 300, 5)], [(t, 50.0) for t in range(300, 600, 5)]]
    assert inv.pooled_slope(flat) == pytest.approx(0.0)
    # a sawtooth of restarts each growing: growth
    saw = [[(t, 50 + 0.02 * (t - s)) for t in range(s, s + 100, 5)] for s in (0, 100, 200)]
    assert inv.pooled_slope(saw) == pytest.approx(0.02)


def test_accounting_names_every_committed_seq() -> None:
    acked = {5: {1: 10, 2: 10, 3: 10, 4: 10, 5: 10}}
    a = inv.account(acked, {5: 5}, {5: [(1, 2), (5, 5)]}, {5: {3}}, {5: set()})
    assert (a.samples_received, a.samples_in_loss_records) == (30, 10)
    assert a.samples_unaccounted == 10 and a.unaccounted_seqs == [(5, 4)]
    # a seq evicted before the harness saw its row still has to be accounted for
    a = inv.account({1: {}}, {1: 2}, {1: [(1, 1)]}, {1: set()}, {1: set()})
    assert a.unaccounted_seqs == [(1, 2)]
    # still in the spool after the final stop: pending, not lost
    a = inv.account({1: {1: 3, 2: 4}}, {1: 2}, {1: [(1, 1)]}, {1: set()}, {1: {2}})
    assert (a.samples_pending, a.samples_unaccounted) == (4, 0)


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_soak_short(tmp_path: Path) -> None:
    from benchmarks.soak.harness import run_soak

    seed = parse_seed(os.environ.get("SOAK_SEED", DEFAULT_SEED))
    seconds = float(os.environ.get("SOAK_SECONDS", "300"))
    report = run_soak(tmp_path / "soak", seed, seconds)
    print({k: report[k] for k in ("seed", "duration_s", "faults_injected", "samples_acknowledged")})
    assert report["faults_injected"], "no fault was injected: the harness did nothing"
    assert report["samples_acknowledged"] > 0 and report["samples_received"] > 0
    assert report["violations"] == [], (
        f"seed {report['seed']} broke invariants (reproduce with SOAK_SEED={report['seed']}):\n"
        + "\n".join(str(v)[:800] for v in report["violations"][:20])
    )
    assert report["samples_unaccounted"] == 0


def test_steady_segments_drop_each_process_warm_up() -> None:
    # a lazily filled pool: +5 in the first 5 min, then flat for 15 min; and a short process
    pool = [(t, 6.0 + min(t, 300) / 60) for t in range(0, 1200, 10)]
    short = [(t, 6.0 + t / 60) for t in range(2000, 2300, 10)]
    steady = inv.steady_segments([pool, short], warmup_s=600, min_span_s=300)
    assert len(steady) == 1 and steady[0][0][0] == 600
    assert inv.pooled_slope(steady) == pytest.approx(0.0)
    assert inv.pooled_slope([pool, short]) > 0  # what the raw slope sees
    # growth that does not stop is still growth
    leak = [(t, 100 + 0.01 * t) for t in range(0, 1800, 10)]
    assert inv.pooled_slope(inv.steady_segments([leak], 600, 300)) == pytest.approx(0.01)


def test_long_profile_spaces_process_faults_and_keeps_the_other_lanes() -> None:
    from benchmarks.soak.schedule import LONG_POWER_MIN_GAP_S, profile_for

    assert (profile_for(1799), profile_for(1800)) == ("short", "long")
    for seed in (1, 2, 3, 20261206):
        short = make_schedule(seed, 3700)
        long = make_schedule(seed, 3700, profile="long")
        power = [f.t for f in long if f.params["lane"] == "power"]
        # a process lives at least 30 min: before the first kill and between two
        assert power and power[0] >= LONG_POWER_MIN_GAP_S
        assert all(b - a >= LONG_POWER_MIN_GAP_S for a, b in itertools.pairwise(power))
        assert len(power) < len([f for f in short if f.params["lane"] == "power"])
        # every other lane draws the same faults as the short profile
        assert [f for f in long if f.params["lane"] != "power"] == [
            f for f in short if f.params["lane"] != "power"
        ]


def test_exclude_drops_kinds_without_moving_the_others() -> None:
    full = make_schedule(4, 300)
    light = make_schedule(4, 300, exclude=("daemon_kill9", "daemon_restart"))
    assert {"daemon_kill9", "daemon_restart"} & {f.kind for f in full}
    assert light == [f for f in full if f.kind not in ("daemon_kill9", "daemon_restart")]
    with pytest.raises(ValueError, match="daemon_kil9"):
        make_schedule(4, 300, exclude=("daemon_kil9",))


def test_resource_slope_judges_steady_state_but_still_sees_a_leak() -> None:
    # processes that fill malloc/pools for 10 min (+15 MB) then stay flat for 12 min:
    # the pooled slope over all samples sees the warm-up, the judged one does not
    warm = [[(s + t, 119.0 + 15 * min(t, 600) / 600) for t in range(0, 1320, 5)] for s in (0, 1400)]
    sl = inv.resource_slope(warm, warmup_s=600, min_span_s=300)
    assert sl.basis == "steady" and sl.steady_processes == 2
    assert sl.per_h == pytest.approx(0.0, abs=1e-9)
    assert sl.pooled_per_h is not None and sl.pooled_per_h > 20
    # the same processes leaking 0.1 MB per update, one update a minute (6 MB/h) keep
    # that slope after their warm-up: the judged figure sees it above the 5 MB/h bound
    leak = [[(t, y + 0.1 * ((t - seg[0][0]) // 60)) for t, y in seg] for seg in warm]
    sl = inv.resource_slope(leak, warmup_s=600, min_span_s=300)
    assert sl.basis == "steady" and sl.per_h == pytest.approx(6.0, rel=0.1)
    # no process lived past its warm-up: the judged figure falls back to the pooled one
    short = [[(s + t, 100.0 + t / 60) for t in range(0, 400, 5)] for s in (0, 500)]
    sl = inv.resource_slope(short, warmup_s=600, min_span_s=300)
    assert sl.basis == "pooled" and sl.steady_per_h is None
    assert sl.per_h == sl.pooled_per_h == pytest.approx(60.0)


def test_robust_slope_ignores_transient_fds_but_sees_a_leak() -> None:
    # 40 minutes of a flat fd count (31) sampled every second, with 30 hung diagnostics
    # clients in the last quarter (one every 20 s), each holding one fd for 90 s: least squares
    # tilts (what the 2026-12-06 run judged, 5.1/h against 5.0), the median does not
    def fds(t: int) -> float:
        hung = sum(1 for start in range(1800, 2400, 20) if start <= t < start + 90)
        return 31.0 + hung

    flat = [[(float(t), fds(t)) for t in range(0, 2400)]]
    assert inv.pooled_slope(flat) * 3600 > 5.0
    assert inv.robust_slope(flat) == pytest.approx(0.0, abs=1e-12)
    # the same process leaking one fd every 10 minutes (6/h) from its start: every later
    # sample moves, so the median moves with them, above the long profile's 5/h bound
    # (a staircase of four steps fits 5.5/h alone, the hung clients lift it)
    leak = [[(t, y + t // 600) for t, y in flat[0]]]
    assert 5.0 < inv.robust_slope(leak) * 3600 < 9.0
    # thinning a long segment keeps the figure
    long = [[(float(t), 10.0 + t / 1800) for t in range(0, 20000)]]
    assert inv.robust_slope(long, max_points=500) * 3600 == pytest.approx(2.0)
    # segments pool; too short ones are skipped, none left is no figure
    assert inv.robust_slope([[(0.0, 1.0), (100.0, 2.0)]]) is None
    assert inv.robust_slope([[(0.0, 1.0), (10.0, 2.0), (20.0, 3.0)]]) is None
