"""The "models" component: loads the configured models and serves their runners.

Theory of operation
-------------------
Built when `models:` lists at least one model, with the ports it needs: `slots`
(`ports.SlotSource`, the updates' verified A/B slots, None when updates do not run),
`measurer` (`ports.Measurer`, the identity) and the event sink. On start (after the slot
repository has recovered, before "loops") each model is loaded *off the event loop* from,
in order of preference:

1. `slots.active(name).model_dir`: the active A/B slot, when updates manage the model and
   one is installed (a verified, committed or trial model);
2. `models[].path` from the config (the shipped model).

When the slot fails to load (a runtime that cannot run what was committed), the error is
logged and published as `model.load_failed` and the shipped model is tried, so the loops
keep a model; when the configured model cannot be loaded either, start-up is refused with
a ConfigError naming `models[i].path` and the reason (not ONNX, ABI mismatch with both
sides, missing manifest field, golden vectors not reproduced).

After every successful load or swap, the SHA-256 of the model's manifest.json is bound
into the identity's measurement (`measurer.bind_model`, a TPM PCR and NV extend), and with
it, when the runner applied a device calibration, the SHA-256 of the overlay document and
its version `X+cal.N` (`runner.overlay_sha256`), so an attestation says which model and
which calibration the gateway runs; a swap back to an uncalibrated slot binds no overlay.

The component is the `ports.ModelHost` of loops and updates: `runner(name)`,
`await swap(name, model_dir)`, `counters(name)`. Status key "models": [{name,
active_slot, version, state}] where active_slot/state/version come from the slot record
when updates manage the model. Socket command `models`: one row per model with version,
precision, threshold, mode (inline or dedicated thread), inference count, faults, NaN
outputs, latency p50/p99 and the recent score mean, and `drift`: the drift monitor's
report (state ok / anomaly / sensor_fault / drift, since, the features that moved by how
many reference sd, the score PSI); the status row carries its numeric summary (and so
the Prometheus metrics `edgerund_model_drift_*`). With a task scope the component runs
the drift task (edgerund.inference.driftwatch) for models with `drift_monitor: true`.

It is also the `ports.Calibrator` of the updates component: `fit_calibration(name)` fits
a device calibration on the drift task's recent blocks in a worker thread at low
priority (edgerund.inference.adapt.fit); the updates component signs it with the device
key and installs it as a `X+cal.N` slot through its gate (docs/learning.md). Its
`counters(name)` carry the drift monitor's state and block counts of the running runner,
which the calibration's probation judges. The `adapt` socket command is the updates
component's; without updates (no slots) this component serves `adapt --dry-run` alone.
A runner running a calibration shows it in `models` (`calibration`: cal.N, samples,
the largest shifts, the threshold against the signed one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import structlog

from edgerund.component import Command, Peer
from edgerund.errors import CommandError, ConfigError
from edgerund.inference import adapt
from edgerund.inference.calibration import CalibrationRefused
from edgerund.inference.drift import DriftConfig
from edgerund.inference.driftwatch import DriftWatch
from edgerund.inference.errors import ModelError
from edgerund.inference.registry import ModelRegistry
from edgerund.inference.runner import ModelRunner
from edgerund.ports import DriftStatus, ModelCounters

if TYPE_CHECKING:
    from edgerund.config.schema import Config
    from edgerund.context import TaskScope
    from edgerund.ports import EventSink, Measurer, SlotProblem, SlotSource

log = structlog.get_logger("edgerund.inference")

__all__ = ["EMPTY_STATUS", "ModelsComponent", "build"]

EMPTY_STATUS: dict[str, object] = {"models": []}


class ModelsComponent:
    name = "models"

    def __init__(
        self,
        cfg: Config,
        *,
        slots: SlotSource | None,
        measurer: Measurer | None,
        events: EventSink,
        registry: ModelRegistry | None = None,
        scope: TaskScope | None = None,
    ) -> None:
        self.slots = slots
        self.scope = scope
        self.measurer = measurer
        self.events = events
        self.configs = list(cfg.models)
        self.registry = registry or ModelRegistry(self.configs)
        self.source: dict[str, str] = {}  # name -> "slot" | "config" | "other" (a swap)
        self.bind_errors = 0
        # Drift monitoring off the tick path (edgerund.inference.driftwatch); runs when
        # the component has a task scope.
        self.drift = DriftWatch(
            self._watched_runners,
            events,
            configs=self._drift_config,
            store=Path(cfg.paths.state_dir) / "models" / "drift_previous.json",
        )

    # -- public API ------------------------------------------------------------------------

    def runner(self, name: str) -> ModelRunner | None:
        return self.registry.runner(name)

    async def swap(self, name: str, model_dir: Path) -> None:
        """Load + check + warm up off the loop, then replace atomically (ModelError on
        failure; the old runner stays)."""
        runner = await self.registry.swap(name, Path(model_dir))
        self.source[name] = "slot" if self._is_slot_dir(name, Path(model_dir)) else "other"
        self.events.publish("model.swapped", name, version=runner.version, dir=str(model_dir))
        await self._bind(runner)

    def counters(self, name: str) -> ModelCounters:
        c = self.registry.counters(name)
        w = self.drift.watched.get(name)
        runner = self.registry.runner(name)
        if w is None or w.monitor is None or runner is None or w.runner is not runner:
            return c  # no monitor for THIS runner yet: drift_state None
        rep = w.monitor.report()
        return dataclasses.replace(
            c,
            drift_state=rep.state,
            drift_since=rep.since,
            drift_blocks=rep.blocks,
            drift_anomaly_blocks=rep.anomaly_blocks,
            drift_fault_blocks=rep.fault_blocks,
        )

    async def fit_calibration(
        self, name: str, *, forced_shift_sd: float | None = None
    ) -> adapt.FittedCalibration:
        """`ports.Calibrator`: CalibrationRefused when it cannot or may not."""
        runner = self.registry.runner(name)
        if runner is None:
            raise CalibrationRefused("unknown_model", f"no model {name!r} is running")
        if forced_shift_sd is not None:
            return await asyncio.to_thread(adapt.forced_calibration, runner, forced_shift_sd)
        blocks = self.drift.blocks(name)
        return await asyncio.to_thread(adapt.fit, runner, blocks)

    def stats(self, name: str) -> dict[str, Any]:
        """Everything about one model, for display."""
        return self.registry.stats(name)

    def drift_status(self, name: str) -> DriftStatus | None:
        """ports.DriftReports: the drift task's verdicts (the updates component's
        post-update drift rollback)."""
        return self.drift.drift_status(name)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        for i, mc in enumerate(self.configs):
            slot_dir = self._slot_dir(mc.name)
            if slot_dir is not None:
                try:
                    runner = await self.registry.load(mc.name, slot_dir)
                    self.source[mc.name] = "slot"
                    await self._bind(runner)
                    continue
                except ModelError as exc:
                    log.error(
                        "model_slot_load_failed",
                        model=mc.name,
                        dir=str(slot_dir),
                        error=str(exc),
                        fallback=mc.path,
                    )
                    self.events.publish(
                        "model.load_failed", mc.name, dir=str(slot_dir), error=str(exc)
                    )
            try:
                runner = await self.registry.load(mc.name, Path(mc.path))
            except ModelError as exc:
                self.registry.close()
                raise ConfigError(str(exc), path=f"models[{i}].path") from None
            self.source[mc.name] = "config"
            log.info(
                "model_loaded",
                model=mc.name,
                version=runner.version,
                precision=runner.manifest.precision,
                mode="inline" if runner.inline else "thread",
                warmup_us=runner.warmup_us,
            )
            await self._bind(runner)
        if self.scope is not None:
            self.scope.spawn("drift", self.drift.run)
        return self

    def _drift_config(self, name: str) -> DriftConfig | None:
        mc = next((m for m in self.configs if m.name == name), None)
        if mc is None:
            return None
        return DriftConfig(block=mc.drift_block, anomaly_max_blocks=mc.drift_anomaly_blocks)

    def _watched_runners(self) -> dict[str, Any]:
        return {
            mc.name: r
            for mc in self.configs
            if mc.drift_monitor and (r := self.registry.runner(mc.name)) is not None
        }

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.registry.close()

    def _slot_dir(self, name: str) -> Path | None:
        rec = self.slots.active(name) if self.slots is not None else None
        return None if rec is None else rec.model_dir

    def _is_slot_dir(self, name: str, d: Path) -> bool:
        cur = self._slot_dir(name)
        return cur is not None and cur.resolve() == d.resolve()

    async def _bind(self, runner: ModelRunner) -> None:
        if self.measurer is None:
            return
        # the signed manifest (runner.manifest is the calibrated copy, same digest) and the
        # overlay in force: a runner without one (a rollback to `X`) unbinds the old overlay
        digest = runner.base_manifest.sha256 or hashlib.sha256(b"").digest()
        overlay = runner.overlay_sha256
        try:
            await self.measurer.bind_model(
                digest,
                runner.name,
                overlay_sha256=overlay,
                overlay_version=runner.version if overlay is not None else None,
            )
        except Exception as exc:  # the model runs regardless; the quote will show it
            self.bind_errors += 1
            log.error("model_bind_failed", model=runner.name, error=repr(exc))

    # -- daemon integration ------------------------------------------------------------------

    def _row(self, name: str) -> dict[str, Any]:
        st = self.registry.state(name)
        r = self.registry.runner(name)
        row: dict[str, Any] = {
            "name": name,
            "active_slot": None,
            "version": None if r is None else r.version,
            "state": st.state,
            # The execution provider in use, and why any asked-for one is not.
            "provider": None if r is None else r.providers.active,
            "provider_fallbacks": [] if r is None else r.providers.as_dict()["provider_fallbacks"],
        }
        rec = self.slots.active(name) if self.slots is not None else None
        if rec is not None:
            row["active_slot"] = rec.active_slot
            row["state"] = rec.state
            # The signed bundle's version is what was installed (the model's own manifest
            # may carry an older one when a model is re-released unchanged).
            if rec.version:
                row["version"] = rec.version
            # Why the previous model is running: a failed update, a quarantined slot.
            if rec.last_failure is not None:
                row["last_failure"] = _problem_row(rec.last_failure)
            if rec.quarantined:
                row["quarantined"] = {k: _problem_row(v) for k, v in rec.quarantined.items()}
        drift = self.drift.status_row(name)
        if drift is not None:
            row["drift"] = drift
        return row

    def status(self) -> dict[str, Any]:
        return {"models": [self._row(n) for n in self.registry.names]}

    def commands(self) -> Mapping[str, Command]:
        cmds = {"models": Command(self._cmd_models, help="loaded models: version, faults, latency")}
        if self.slots is None:  # else `adapt` is the updates component's (the gate)
            cmds["adapt"] = Command(
                self._cmd_adapt,
                help="args model, dry_run: fit a calibration within the signed policy",
            )
        return cmds

    async def dry_run(self, name: str) -> dict[str, Any]:
        """Fit a calibration on the drift task's recent blocks, off the loop at low
        priority, check it against the signed policy and the must-detect vectors, and
        say what it would change (nothing is installed)."""
        runner = self.registry.runner(name)
        if runner is None:
            raise CommandError("unknown_model", f"expected one of {self.registry.names}")
        blocks = self.drift.blocks(name)
        try:
            return await asyncio.to_thread(adapt.dry_run, runner, blocks)
        except CalibrationRefused as exc:
            return {"ok": False, "refused": exc.reason, "message": exc.detail}

    async def _cmd_adapt(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        name = args.get("model")
        if not isinstance(name, str) or self.registry.runner(name) is None:
            raise CommandError("unknown_model", f"expected one of {self.registry.names}")
        if not args.get("dry_run"):
            raise CommandError(
                "not_available",
                "updates are disabled: a calibration is installed as a +cal.N slot through "
                "the update gate; use --dry-run to see what it would change",
            )
        return await self.dry_run(name)

    async def _cmd_models(self, args: dict[str, Any], peer: Peer) -> list[dict[str, Any]]:
        rows = []
        for name in self.registry.names:
            row = self._row(name)
            s = self.registry.stats(name)
            lat = s.get("infer_us") or {}
            score = s.get("score") or {}
            row.update(
                source=self.source.get(name),
                precision=s.get("precision"),
                threshold=s.get("threshold"),
                mode=s.get("mode"),
                inferences=s.get("inferences", 0),
                faults=s.get("faults", 0),
                nan_outputs=s.get("nan_outputs", 0),
                infer_p50_us=lat.get("p50"),
                infer_p99_us=lat.get("p99"),
                score_mean=None if score.get("mean") is None else round(score["mean"], 4),
                providers_requested=s.get("providers_requested"),
                last_error=s.get("last_error") or s.get("last_fault"),
                dir=s.get("model_dir"),
                calibration=s.get("calibration"),
            )
            detail = self.drift.detail(name)
            if detail is not None:
                row["drift"] = detail
            rows.append(row)
        return rows

    def reload(self, config: Config) -> None:
        """Models change through updates or a restart; a SIGHUP changes nothing here."""
        new = {m.name: m.path for m in config.models}
        old = {m.name: m.path for m in self.configs}
        if new != old:
            log.warning("models_config_changed_needs_restart", old=old, new=new)


def build(
    cfg: Config,
    *,
    slots: SlotSource | None,
    measurer: Measurer | None,
    events: EventSink,
    scope: TaskScope | None = None,
) -> ModelsComponent | None:
    if not cfg.models:
        return None
    import onnxruntime

    # A gateway phones home to nobody: onnxruntime's usage telemetry stays off.
    onnxruntime.disable_telemetry_events()
    return ModelsComponent(cfg, slots=slots, measurer=measurer, events=events, scope=scope)


def _problem_row(p: SlotProblem) -> dict[str, object]:
    return {"reason": p.reason, "message": p.message, "at": p.at}
