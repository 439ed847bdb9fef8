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
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog

from edgerund.inference import federated
from edgerund.inference.drift import DriftConfig, DriftMonitor, feature_channels
from edgerund.ports import DriftStatus, EventSink

log = structlog.get_logger("edgerund.inference.drift")

__all__ = ["TAP_MAX", "DriftWatch", "monitor_for"]

TAP_MAX = 4096


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
        # the replaced model's last verdict: (version, state, blocks)
        self.previous: tuple[str, str, int] | None = None


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
    ) -> None:
        self._runners = runners
        self.events = events
        self.interval_s = interval_s
        self.stats_interval_s = stats_interval_s
        self.config = config or DriftConfig()
        self._configs = configs
        self.clock = clock
        self.watched: dict[str, _Watched] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.poll_once()

    def poll_once(self) -> None:
        now = self.clock()
        for name, runner in self._runners().items():
            w = self.watched.get(name)
            if w is None or w.runner is not runner:
                if w is not None and getattr(w.runner, "tap", None) is w.tap:
                    w.runner.tap = None
                cfg = (self._configs(name) if self._configs else None) or self.config
                prev = None
                if w is not None:
                    seen = w.monitor.report().blocks if w.monitor is not None else 0
                    prev = (str(w.runner.version), w.state, seen)
                w = _Watched(runner, monitor_for(runner, cfg))
                w.previous = prev
                self.watched[name] = w
                w.last_stats = now
                if w.monitor is not None:
                    runner.tap = w.tap
            if w.monitor is None:
                continue
            self._drain(name, w, now)

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
