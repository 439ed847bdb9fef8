"""The "models" component: loads the configured models and serves their runners.

Theory of operation
-------------------
Built when `models:` lists at least one model. On start (after "updates", before "loops")
each model is loaded *off the event loop* from, in order of preference:

1. `updates.model_dir(name)`: the active A/B slot, when the updates component exists and
   has one (a verified, committed or trial model);
2. `models[].path` from the config (the shipped model).

When the slot fails to load (a runtime that cannot run what was committed), the error is
logged and published as `model.load_failed` and the shipped model is tried, so the loops
keep a model; when the configured model cannot be loaded either, start-up is refused with
a ConfigError naming `models[i].path` and the reason (not ONNX, ABI mismatch with both
sides, missing manifest field, golden vectors not reproduced).

After every successful load or swap, the SHA-256 of the model's manifest.json is bound
into the identity's measurement (`identity.bind_model`, a TPM PCR extend), so an
attestation quote says which model the gateway runs.

Public API (other components): `runner(name)`, `await swap(name, model_dir)`,
`stats(name)`. Status key "models": [{name, active_slot, version, state}] where
active_slot/state come from `updates.slot_info(name)` when updates manages the model.
Socket command `models`: one row per model with version, precision, threshold, mode
(inline or dedicated thread), inference count, faults, NaN outputs, latency p50/p99 and
the recent score mean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from edgerund.component import Command, Peer
from edgerund.context import Context
from edgerund.errors import ConfigError
from edgerund.inference.errors import ModelError
from edgerund.inference.registry import ModelRegistry
from edgerund.inference.runner import ModelRunner

log = structlog.get_logger("edgerund.inference")

__all__ = ["ModelsComponent", "build"]


class ModelsComponent:
    name = "models"

    def __init__(self, ctx: Context, registry: ModelRegistry | None = None) -> None:
        self.ctx = ctx
        self.configs = list(ctx.config.models)
        self.registry = registry or ModelRegistry(self.configs)
        self.source: dict[str, str] = {}  # name -> "slot" | "config" | "other" (a swap)
        self.bind_errors = 0

    # -- public API ------------------------------------------------------------------------

    def runner(self, name: str) -> ModelRunner | None:
        return self.registry.runner(name)

    async def swap(self, name: str, model_dir: Path) -> None:
        """Load + check + warm up off the loop, then replace atomically (ModelError on
        failure; the old runner stays)."""
        runner = await self.registry.swap(name, Path(model_dir))
        self.source[name] = "slot" if self._is_slot_dir(name, Path(model_dir)) else "other"
        self.ctx.events.publish("model.swapped", name, version=runner.version, dir=str(model_dir))
        await self._bind(runner)

    def stats(self, name: str) -> dict[str, Any]:
        return self.registry.stats(name)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        updates = self.ctx.get("updates")
        for i, mc in enumerate(self.configs):
            slot_dir = _updates_dir(updates, mc.name)
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
                    self.ctx.events.publish(
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
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.registry.close()

    def _is_slot_dir(self, name: str, d: Path) -> bool:
        cur = _updates_dir(self.ctx.get("updates"), name)
        return cur is not None and Path(cur).resolve() == d.resolve()

    async def _bind(self, runner: ModelRunner) -> None:
        identity = self.ctx.get("identity")
        if identity is None or not hasattr(identity, "bind_model"):
            return
        digest = runner.manifest.sha256 or hashlib.sha256(b"").digest()
        try:
            await identity.bind_model(digest, runner.name)
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
        }
        info = _slot_info(self.ctx.get("updates"), name)
        if info:
            row["active_slot"] = info.get("active_slot")
            if info.get("state") is not None:
                row["state"] = str(info["state"])
            # The signed bundle's version is what was installed (the model's own manifest
            # may carry an older one when a model is re-released unchanged).
            if info.get("version"):
                row["version"] = str(info["version"])
            # Why the previous model is running: a failed update, a quarantined slot.
            if info.get("last_failure"):
                row["last_failure"] = info["last_failure"]
            if info.get("quarantined"):
                row["quarantined"] = info["quarantined"]
        return row

    def status(self) -> dict[str, Any]:
        return {"models": [self._row(n) for n in self.registry.names]}

    def commands(self) -> Mapping[str, Command]:
        return {"models": Command(self._cmd_models, help="loaded models: version, faults, latency")}

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
                last_error=s.get("last_error") or s.get("last_fault"),
                dir=s.get("model_dir"),
            )
            rows.append(row)
        return rows

    def reload(self, config: Any) -> None:
        """Models change through updates or a restart; a SIGHUP changes nothing here."""
        new = {m.name: m.path for m in getattr(config, "models", [])}
        old = {m.name: m.path for m in self.configs}
        if new != old:
            log.warning("models_config_changed_needs_restart", old=old, new=new)


def _updates_dir(updates: Any, name: str) -> Path | None:
    if updates is None or not hasattr(updates, "model_dir"):
        return None
    try:
        d = updates.model_dir(name)
    except Exception as exc:
        log.error("updates_model_dir_failed", model=name, error=repr(exc))
        return None
    return None if d is None else Path(d)


def _slot_info(updates: Any, name: str) -> dict[str, Any]:
    if updates is None or not hasattr(updates, "slot_info"):
        return {}
    try:
        info = updates.slot_info(name)
    except Exception:
        return {}
    return info if isinstance(info, dict) else {}


def build(ctx: Context) -> ModelsComponent | None:
    if not ctx.config.models:
        return None
    import onnxruntime

    # A gateway phones home to nobody: onnxruntime's usage telemetry stays off.
    onnxruntime.disable_telemetry_events()
    return ModelsComponent(ctx)
