"""The drift task: taps installed on runners, transitions logged as events, a swapped
runner gets a fresh monitor, statistics published as edgerund.fedstats/1."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgerund.ctl.render import model_row
from edgerund.inference.driftwatch import DriftWatch
from edgerund.inference.manifest import load_manifest
from tests.inference.conftest import REF

MAN = load_manifest(REF)


@dataclass
class FakeRunner:
    name: str = "motor-ae"
    version: str = "2.0.0"
    threshold: float = MAN.threshold
    manifest: Any = MAN
    tap: Any = None


@dataclass
class Sink:
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def publish(self, kind: str, source: str, **fields: Any) -> Any:
        self.events.append((kind, source, fields))


def test_drift_events_swap_and_stats() -> None:
    assert MAN.profile is not None
    runners = {"motor-ae": FakeRunner()}
    sink = Sink()
    now = [0.0]
    watch = DriftWatch(lambda: runners, sink, stats_interval_s=30.0, clock=lambda: now[0])
    watch.poll_once()
    r = runners["motor-ae"]
    assert r.tap is not None  # installed
    mu = np.asarray(MAN.profile.mean)
    sd = np.asarray(MAN.profile.std)
    rng = np.random.default_rng(0)
    shift = np.zeros(50)
    shift[:16] = 3.0 * sd[:16]  # the x axis's bands up 3 sd: a sensor gain change
    for step in range(40):
        for _ in range(100):
            x = mu + rng.normal(0.0, 0.2, 50) * sd + (shift if step >= 10 else 0.0)
            r.tap.append((x, 1.0))
        now[0] += 1.0
        watch.poll_once()
    kinds = [k for k, _, _ in sink.events]
    assert "drift.detected" in kinds, kinds
    det = next(f for k, _, f in sink.events if k == "drift.detected")
    assert det["moved"] and det["moved"][0]["feature"].startswith("accel_g.x.")
    stats = [f for k, _, f in sink.events if k == "drift.stats"]
    assert stats and stats[0]["format"] == "edgerund.fedstats/1" and stats[0]["count"] > 0
    row = watch.status_row("motor-ae")
    assert row is not None and row["state"] == "drift" and row["n_moved"] >= 4
    assert model_row({"name": "m", "drift": watch.detail("motor-ae")})["drift"].startswith("drift ")
    # an update swaps the runner: the old tap is removed, a fresh monitor starts at ok
    runners["motor-ae"] = FakeRunner(version="2.0.1")
    watch.poll_once()
    assert r.tap is None and runners["motor-ae"].tap is not None
    assert watch.status_row("motor-ae")["state"] == "ok"  # type: ignore[index]
    # ... and the replaced model's last verdict stays beside it (post-update drift rule)
    st = watch.drift_status("motor-ae")
    assert st is not None and (st.version, st.state, st.blocks) == ("2.0.1", "ok", 0)
    assert (st.previous_version, st.previous_state) == ("2.0.0", "drift")
    assert st.previous_blocks == 40
    assert watch.drift_status("other") is None


def test_model_without_profile_is_shown_as_such() -> None:
    from dataclasses import replace

    runners = {"m": FakeRunner(manifest=replace(MAN, profile=None))}
    watch = DriftWatch(lambda: runners, Sink())
    watch.poll_once()
    assert runners["m"].tap is None
    assert watch.status_row("m") == {"state": "no_profile"}
