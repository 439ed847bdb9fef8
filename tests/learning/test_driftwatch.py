"""The drift task: taps installed on runners, transitions logged as events, a swapped
runner gets a fresh monitor, statistics published as edgerund.fedstats/1."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgerund.ctl.render import model_row
from edgerund.inference.driftwatch import DriftWatch, load_previous
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


async def test_the_replaced_models_verdict_survives_a_restart(tmp_path: Path) -> None:
    # The post-update drift rule compares the new model with the verdict on the model it
    # replaced, taken before the swap: a restart must not forget it.
    store = tmp_path / "models" / "drift_previous.json"
    runners = {"motor-ae": FakeRunner(version="2.0.0")}
    watch = DriftWatch(lambda: runners, Sink(), interval_s=0.01, store=store)
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.sleep(0.05)
        r = runners["motor-ae"]
        mu, sd = np.asarray(MAN.profile.mean), np.asarray(MAN.profile.std)  # type: ignore[union-attr]
        rng = np.random.default_rng(1)
        for _ in range(6):  # six normal blocks: the old model's profile matched
            for _ in range(100):
                r.tap.append((mu + rng.normal(0.0, 0.2, 50) * sd, 1.0))
            await asyncio.sleep(0.03)
        runners["motor-ae"] = FakeRunner(version="2.0.2")  # the update swaps it
        for _ in range(200):
            await asyncio.sleep(0.01)
            if store.exists():
                break
    finally:
        task.cancel()
    assert json.loads(store.read_text())["motor-ae"]["version"] == "2.0.2"
    before = watch.drift_status("motor-ae")
    assert before is not None and before.previous_state == "ok" and before.previous_blocks >= 5

    # a new process: the same model version runs, the verdict comes back from the store
    again = DriftWatch(lambda: {"motor-ae": FakeRunner(version="2.0.2")}, Sink(), store=store)
    again.saved = load_previous(store)
    again.poll_once()
    st = again.drift_status("motor-ae")
    assert st is not None
    assert (st.previous_version, st.previous_state, st.previous_blocks) == (
        before.previous_version, before.previous_state, before.previous_blocks,
    )  # fmt: skip
    # ... but not for another version (rolled back, or updated again while it was down)
    other = DriftWatch(lambda: {"motor-ae": FakeRunner(version="2.0.1")}, Sink(), store=store)
    other.saved = load_previous(store)
    other.poll_once()
    st = other.drift_status("motor-ae")
    assert st is not None and st.previous_version is None


def test_a_corrupt_store_is_ignored(tmp_path: Path) -> None:
    store = tmp_path / "drift_previous.json"
    for bad in (b"{", b"[1, 2]", b'{"m": {"version": 1}}', b'{"m": {"version": "1", "previous": [1]}}',
                b"[" * 100 + b"]" * 100, b" " * (70_000)):  # fmt: skip
        store.write_bytes(bad)
        assert load_previous(store) == {}
    assert load_previous(tmp_path / "missing.json") == {}
    store.write_bytes(b'{"m": {"version": "2", "previous": ["1", "ok", 7]}, "x": 3}')
    assert load_previous(store) == {"m": ("2", ("1", "ok", 7))}
