"""The models component's drift task: runner taps -> drift monitors -> state, events, log.

Theory of operation
-------------------
The tick path pays one bounded append: after a successful inference the runner copies
its 50-value feature vector and the score into `runner.tap` (a `deque(maxlen=TAP_MAX)`
that this task installed; when the task falls behind, the oldest entries are dropped and
counted, never the tick delayed). Once a second (`interval_s`) the task, in the models
component's TaskScope, drains every tap into that model's `DriftMonitor`
(edgerund.inference.drift), a few numpy operations per completed block.

A runner object that changed (an update swapped the model) gets a fresh monitor built
from *its* manifest's reference profile and threshold; a model without a profile is shown
as `state: "no_profile"`. The replaced model's last verdict (version, state, blocks) is
kept beside it (`drift_status`): the updates component rolls a freshly committed model
back when it drifts from its own profile where the previous one had not
(edgerund.updates.postdrift). On a change of state the task logs and publishes an event:
`drift.detected` (with the features that moved), `drift.sensor_fault` (the channel),
`drift.cleared`; every `stats_interval_s` it publishes `drift.stats`, the monitor's
sufficient statistics (counts, sums, sums of squares per feature, the score histogram),
the compact upstream aggregate of edgerund.inference.federated (never raw windows).

The replaced model's verdict is persisted (`store`, `<state_dir>/models/drift_previous.json`):
it was taken before the swap and cannot be measured again, so without it a restart (a
power cut the day after an update) would end the post-update drift watch of the new
model. At each swap the task writes {model: {version: new, previous: [version, state,
blocks]}} in a worker thread (temp file, fsync, rename); at start-up it reads it back off
the loop, and an entry applies only while the running version is the one it was written
for. The file is not authenticated: whoever can write the state directory can make the
rule fire (a rollback to the previous slot, which is re-verified first) or not fire
(as deleting it does), nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from edgerund.inference import federated
from edgerund.inference.drift import DriftConfig, DriftMonitor, feature_channels
from edgerund.jsondepth import too_deep
from edgerund.ports import DriftStatus, EventSink
from edgerund.updates import fsutil

log = structlog.get_logger("edgerund.inference.drift")

__all__ = ["TAP_MAX", "DriftWatch", "monitor_for"]

TAP_MAX = 4096
STORE_MAX_BYTES = 1 << 16
Previous = tuple[str, str, int]  # the replaced model's last verdict: (version, state, blocks)


def monitor_for(runner: Any, config: DriftConfig | None = None) -> DriftMonitor | None:
    """A monitor for `runner`'s manifest (None when the manifest has no profile)."""
    man = runner.manifest
    if man.profile is None:
        return None
    spec = man.preprocessing
    names, channels = feature_channels(
        spec.n_features, spec.axes, spec.n_bands, spec.vibration_input, spec.scalars
    )
    vib = [c for c in channels if c.startswith(f"{spec.vibration_input}.")]
    return DriftMonitor(
        man.profile,
        float(runner.threshold),
        names=names,
        channels=channels,
        vibration_channels=vib,
        config=config,
    )


class _Watched:
    def __init__(self, runner: Any, monitor: DriftMonitor | None) -> None:
        self.runner = runner
        self.monitor = monitor
        self.tap: deque[tuple[Any, float]] = deque(maxlen=TAP_MAX)
        self.seen = 0
        self.state = "ok" if monitor is not None else "no_profile"
        self.last_stats = 0.0
        # fitting material for an adaptation: recent blocks with their labels
        self.blocks: deque[tuple[Any, Any, str]] = deque(maxlen=64)
        self._bx: list[Any] = []
        self._bs: list[float] = []
        self.previous: Previous | None = None


class DriftWatch:
    def __init__(
        self,
        runners: Callable[[], dict[str, Any]],
        events: EventSink,
        *,
        interval_s: float = 1.0,
        stats_interval_s: float = 600.0,
        config: DriftConfig | None = None,
        configs: Callable[[str], DriftConfig | None] | None = None,
        clock: Callable[[], float] = time.time,
        store: Path | None = None,
    ) -> None:
        self._runners = runners
        self.events = events
        self.interval_s = interval_s
        self.stats_interval_s = stats_interval_s
        self.config = config or DriftConfig()
        self._configs = configs
        self.clock = clock
        self.watched: dict[str, _Watched] = {}
        self.store = store
        # what the store says, {model: (running version, previous verdict)}
        self.saved: dict[str, tuple[str, Previous]] = {}
        self.store_errors = 0

    async def run(self) -> None:
        if self.store is not None:
            self.saved = await asyncio.to_thread(load_previous, self.store)
        while True:
            await asyncio.sleep(self.interval_s)
            if self.poll_once() and self.store is not None:
                try:
                    await asyncio.to_thread(save_previous, self.store, dict(self.saved))
                except OSError as exc:
                    self.store_errors += 1
                    log.warning("drift_previous_save_failed", path=str(self.store), error=repr(exc))

    def poll_once(self) -> bool:
        """Drain the taps; True when a swap changed a replaced model's verdict (to save)."""
        swapped = False
        now = self.clock()
        for name, runner in self._runners().items():
            w = self.watched.get(name)
            if w is None or w.runner is not runner:
                if w is not None and getattr(w.runner, "tap", None) is w.tap:
                    w.runner.tap = None
                cfg = (self._configs(name) if self._configs else None) or self.config
                prev: Previous | None = None
                if w is not None:
                    seen = w.monitor.report().blocks if w.monitor is not None else 0
                    prev = (str(w.runner.version), w.state, seen)
                    self.saved[name] = (str(runner.version), prev)
                    swapped = True
                elif (kept := self.saved.get(name)) is not None and kept[0] == str(runner.version):
                    prev = kept[1]  # taken before a restart, about the model this one replaced
                w = _Watched(runner, monitor_for(runner, cfg))
                w.previous = prev
                self.watched[name] = w
                w.last_stats = now
                if w.monitor is not None:
                    runner.tap = w.tap
            if w.monitor is None:
                continue
            self._drain(name, w, now)
        return swapped

    def _drain(self, name: str, w: _Watched, now: float) -> None:
        mon = w.monitor
        assert mon is not None
        tap = w.tap
        while tap:
            x, score = tap.popleft()
            w.seen += 1
            w._bx.append(x)
            w._bs.append(score)
            rep = mon.feed(x, score, now)
            if rep is None:
                continue
            w.blocks.append((np.stack(w._bx), np.asarray(w._bs), rep.state))
            w._bx, w._bs = [], []
            if rep.state != w.state:
                self._transition(name, w, rep.state)
        if now - w.last_stats >= self.stats_interval_s and mon.count:
            w.last_stats = now
            doc = federated.encode(
                mon.sufficient(), model=str(w.runner.name), version=str(w.runner.version)
            )
            self.events.publish("drift.stats", name, **doc)

    def _transition(self, name: str, w: _Watched, state: str) -> None:
        assert w.monitor is not None
        rep = w.monitor.report()
        old, w.state = w.state, state
        fields: dict[str, Any] = {
            "state": state,
            "previous": old,
            "reason": rep.reason,
            "moved": rep.moved,
            "psi": round(rep.psi, 4),
        }
        if state == "drift":
            log.warning("drift_detected", model=name, **fields)
            self.events.publish("drift.detected", name, **fields)
        elif state == "sensor_fault":
            log.warning("drift_sensor_fault", model=name, channel=rep.channel, **fields)
            self.events.publish("drift.sensor_fault", name, channel=rep.channel, **fields)
        elif state == "ok" and old in ("drift", "sensor_fault"):
            log.info("drift_cleared", model=name, **fields)
            self.events.publish("drift.cleared", name, **fields)

    # -- views -----------------------------------------------------------------------------

    def status_row(self, name: str) -> dict[str, Any] | None:
        """Compact, metric-friendly: numbers and a state (no lists)."""
        w = self.watched.get(name)
        if w is None:
            return None
        if w.monitor is None:
            return {"state": "no_profile"}
        rep = w.monitor.report()
        return {
            "state": rep.state,
            "since": rep.since,
            "n_moved": rep.n_moved,
            "max_shift_sd": max((abs(d["shift_sd"]) for d in rep.moved), default=0.0),
            "psi": round(rep.psi, 4),
            "blocks": rep.blocks,
            "anomaly_blocks": rep.anomaly_blocks,
            "fault_blocks": rep.fault_blocks,
            "channel": rep.channel,
        }

    def drift_status(self, name: str) -> DriftStatus | None:
        w = self.watched.get(name)
        if w is None:
            return None
        rep = w.monitor.report() if w.monitor is not None else None
        prev = w.previous
        return DriftStatus(
            version=str(w.runner.version),
            state=w.state,
            reason="" if rep is None else rep.reason,
            blocks=0 if rep is None else rep.blocks,
            previous_version=None if prev is None else prev[0],
            previous_state=None if prev is None else prev[1],
            previous_blocks=0 if prev is None else prev[2],
        )

    def blocks(self, name: str) -> list[tuple[Any, Any, str]]:
        """The recent labelled blocks (fitting material for an adaptation)."""
        w = self.watched.get(name)
        return [] if w is None else list(w.blocks)

    def detail(self, name: str) -> dict[str, Any] | None:
        w = self.watched.get(name)
        if w is None or w.monitor is None:
            return None if w is None else {"state": "no_profile"}
        return w.monitor.report().to_json()


def load_previous(path: Path) -> dict[str, tuple[str, Previous]]:
    """The store's entries that are well formed; none when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(STORE_MAX_BYTES + 1)
        if len(data) > STORE_MAX_BYTES or too_deep(data, 4):
            raise ValueError("not a drift store")
        doc = json.loads(data)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("drift_previous_unreadable", path=str(path), error=repr(exc))
        return {}
    out: dict[str, tuple[str, Previous]] = {}
    if not isinstance(doc, dict):
        return out
    for name, e in doc.items():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            v, (pv, ps, pb) = e["version"], e["previous"]
            if isinstance(v, str) and isinstance(pv, str) and isinstance(ps, str):
                out[str(name)] = (v, (pv, ps, int(pb)))
    return out


def save_previous(path: Path, saved: dict[str, tuple[str, Previous]]) -> None:
    doc = {n: {"version": v, "previous": list(p)} for n, (v, p) in saved.items()}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fsutil.atomic_write(path, json.dumps(doc, separators=(",", ":")).encode(), mode=0o600)
