"""The "loops" component: builds every configured control loop and owns its task.

Theory of operation
-------------------
`build(cfg, ...)` returns None when no loop is configured. The composition root passes
the ports the loops need: `samples` (`ports.SampleSource`, the hub), `resources` (the
transports the hub opened, which actuators share), `models` (`ports.ModelHost`, None when
no model is configured), the event sink, the component's `TaskScope`, and the actuator
drivers by config name (the production registry, plus the emulated actuator in simulated
mode: the root's choice, not this module's). `__aenter__`:

1. checks what the config alone could not: every input and rule channel exists on the hub
   (`samples.channels()`), and, when the model is already loaded, its manifest's input ABI
   fits the loop's inputs. Both are ConfigErrors naming the loop key and both sides;
2. opens each loop's actuator through its driver spec and writes its safe state before the
   first tick; an `mqtt` actuator is bound to the event bus (`actuator.command` events,
   forwarded by the telemetry uplink);
3. warms each loop (`ControlLoop.warm`: the tick's inputs, model call, rules, policy,
   histograms and status run 20 times and are forgotten), so no first call lands on a
   deadline;
4. spawns one task per loop in its scope, *not* restartable: a loop that crashed
   on a bug has already driven its actuator safe, and the daemon exits so systemd restarts
   it rather than running a loop in an unknown state. Device faults and model faults do
   not crash a loop (they are counted and handled by fallback/safe state).
   With `hold=True` (the daemon) the tasks wait for `release()` before their first
   deadline: the root enters the components after this one, collects and freezes the
   start-up heap (a full collection takes tens of ms) and only then releases the loops
   and sends READY, so the first tick meets a warm, quiet process.

While loops run, the interpreter's GIL switch interval is lowered to 0.5 ms (restored on
exit): a worker thread running Python code can otherwise hold the GIL for 5 ms while a
loop's timer has fired.

`__aexit__` (shutdown, or the daemon unwinding after a fault) closes its scope (cancelling
the loop tasks), then
drives every actuator to its safe state while the hub's buses are still open (the daemon
exits components in reverse order), and closes the drivers. It also runs the safe-state
writes when start-up fails half way.

Timing environment: the daemon installs uvloop when available and calls `gc.freeze()`
after start-up (edgerund/daemon.py); the scheduler copes with uvloop's early wake-ups.
Status: `{"loops": [...]}`; socket command `loops` (optional `id`). As `ports.LoopStats`
(probation) it sums the loops' tick counters in `counters()`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import msgspec
import structlog

from drivers.base import ActuatorDriver, Resources
from drivers.registry import ActuatorSpec, actuator_drivers
from edgerund.component import Command, CommandError, Peer
from edgerund.control.config import LoopConfig, actuator_driver_name
from edgerund.control.loop import ControlLoop, _Input, abi_mismatch
from edgerund.errors import ConfigError, DeviceError
from edgerund.ports import LoopCounters

if TYPE_CHECKING:
    from edgerund.config.schema import Config
    from edgerund.context import TaskScope
    from edgerund.ports import EventSink, ModelHost, SampleSource

log = structlog.get_logger("edgerund.control")

STALE_SAMPLE_PERIODS = 3.0  # default staleness: this many sensor sample periods + one tick
# How long a thread may hold the GIL while another waits for it. CPython's default is 5 ms:
# a worker thread running Python code (telemetry encoding, bundle hashing) could delay a
# loop's wake-up by that much. 0.5 ms bounds it (measured: bundle verification load, tick
# lateness p99 3.1 ms -> 0.001 ms); the cost is more frequent thread switches.
GIL_SWITCH_INTERVAL_S = 0.0005


EMPTY_STATUS: dict[str, object] = {"loops": []}


def build(
    cfg: Config,
    *,
    samples: SampleSource,
    resources: Resources,
    models: ModelHost | None,
    events: EventSink,
    scope: TaskScope,
    actuators: Mapping[str, ActuatorSpec],
    hold: bool = False,
) -> LoopsComponent | None:
    if not cfg.loops:
        return None
    return LoopsComponent(
        cfg,
        samples=samples,
        resources=resources,
        models=models,
        events=events,
        scope=scope,
        actuators=actuators,
        hold=hold,
    )


class LoopsComponent:
    name = "loops"

    def __init__(
        self,
        cfg: Config,
        *,
        samples: SampleSource,
        resources: Resources,
        models: ModelHost | None,
        events: EventSink,
        scope: TaskScope,
        actuators: Mapping[str, ActuatorSpec] | None = None,
        hold: bool = False,
    ) -> None:
        """`actuators` defaults to the production registry (drivers.registry); `hold`:
        the loops tick only after `release()`."""
        self.hold = hold
        self.cfg = cfg
        self.samples = samples
        self.resources = resources
        self.models = models
        self.events = events
        self.scope = scope
        self.actuators = dict(actuators if actuators is not None else actuator_drivers())
        self.loops: list[ControlLoop] = []
        self._drivers: list[tuple[ControlLoop | None, ActuatorDriver]] = []
        self._prev_switch_s: float | None = None

    # --- start-up ---------------------------------------------------------------------

    def _stale_s(self, loop: LoopConfig, sensor_id: str, config: Config | None = None) -> float:
        if loop.stale_after_ms is not None:
            return loop.stale_after_ms / 1000.0
        rate = 1.0
        for s in (config or self.cfg).sensors:
            if s.id == sensor_id:
                rate = s.rate_hz
        return STALE_SAMPLE_PERIODS / max(rate, 1e-6) + loop.period_ms / 1000.0

    def _known_channels(self) -> dict[str, list[str]]:
        known: dict[str, list[str]] = {}
        for sensor_id, channel, _unit in self.samples.channels():
            known.setdefault(sensor_id, []).append(channel)
        return known

    @staticmethod
    def _rule_problems(i: int, loop: LoopConfig, known: dict[str, list[str]]) -> list[str]:
        return [
            f"loops[{i}].fallback[{j}].channel: sensor {rule.sensor!r} has no "
            f"channel {rule.channel!r} (expected one of: {known.get(rule.sensor, [])})"
            for j, rule in enumerate(loop.fallback)
            if rule.channel not in known.get(rule.sensor, [])
        ]

    def _check_channels(self) -> None:
        known = self._known_channels()
        problems: list[str] = []
        for i, loop in enumerate(self.cfg.loops):
            for j, inp in enumerate(loop.inputs):
                for ch in inp.channels:
                    if ch not in known.get(inp.sensor, []):
                        problems.append(
                            f"loops[{i}].inputs[{j}].channels: sensor {inp.sensor!r} has no "
                            f"channel {ch!r} (expected one of: {known.get(inp.sensor, [])})"
                        )
            problems.extend(self._rule_problems(i, loop, known))
        if problems:
            raise ConfigError("; ".join(problems))

    def _check_abi(self, idx: int, loop: ControlLoop) -> None:
        if self.models is None or loop.cfg.model is None:
            return
        runner = self.models.runner(loop.cfg.model)
        if runner is None:
            log.warning(
                "loop_model_not_loaded",
                loop=loop.id,
                model=loop.cfg.model,
                effect="fallback until it is",
            )
            return
        inputs: list[_Input] = loop.inputs
        err = abi_mismatch(runner.manifest, inputs)
        if err is not None:
            raise ConfigError(
                f"model {loop.cfg.model!r} does not fit the loop: {err}",
                path=f"loops[{idx}].inputs",
            )

    def _open_actuator(self, idx: int, cfg: LoopConfig) -> ActuatorDriver | None:
        acfg = cfg.actuator
        if acfg is None:
            return None
        name = actuator_driver_name(acfg)
        spec = self.actuators.get(name)
        if spec is None or not isinstance(acfg, spec.config_type):
            raise ConfigError(
                f"no actuator driver {name!r} (known: {sorted(self.actuators)})",
                path=f"loops[{idx}].actuator.driver",
            )
        drv = spec.factory(acfg, self.resources)
        bind = getattr(drv, "bind", None)
        if callable(bind):
            loop_id = cfg.id

            def sink(command: str, value: float) -> None:
                self.events.publish("actuator.command", loop_id, command=command, value=value)

            bind(sink)
        return drv

    async def __aenter__(self) -> Self:
        cfgs = self.cfg.loops
        self._prev_switch_s = sys.getswitchinterval()
        sys.setswitchinterval(min(self._prev_switch_s, GIL_SWITCH_INTERVAL_S))
        try:
            self._check_channels()
            for i, cfg in enumerate(cfgs):
                drv = self._open_actuator(i, cfg)
                loop = ControlLoop(
                    cfg,
                    hub=self.samples,
                    models=self.models,
                    publish=self.events.publish,
                    actuator=drv,
                    input_stale_s={inp.name: self._stale_s(cfg, inp.sensor) for inp in cfg.inputs},
                    rule_stale_s=[self._stale_s(cfg, r.sensor) for r in cfg.fallback],
                    hold=self.hold,
                )
                self._check_abi(i, loop)
                if drv is not None:
                    try:
                        await drv.open()
                    except DeviceError as exc:
                        raise DeviceError(
                            f"loops[{i}].actuator ({loop.actuator_driver}): {exc}"
                        ) from exc
                    self._drivers.append((loop, drv))
                    await loop.start()
                self.loops.append(loop)
            for loop in self.loops:
                await loop.warm()
            for loop in self.loops:
                self.scope.spawn(loop.id, loop.run, restart=False)
        except BaseException:
            await self._shutdown("start-up failed")
            raise
        log.info(
            "loops_started",
            loops=[lp.id for lp in self.loops],
            gil_switch_interval_ms=sys.getswitchinterval() * 1000,
        )
        return self

    def release(self) -> None:
        """Start the held loops (see `hold`): their first deadlines follow now."""
        for loop in self.loops:
            loop.release()

    # --- shutdown ---------------------------------------------------------------------

    async def _shutdown(self, why: str) -> None:
        # The loop tasks must be gone before the safe-state writes (a tick in flight would
        # overwrite them); the root's closing of the scope afterwards then finds nothing.
        await self.scope.aclose()
        for loop, drv in self._drivers:
            if loop is not None:
                await loop.drive_safe(why)
            with contextlib.suppress(Exception):
                await drv.close()
        self._drivers.clear()
        if self._prev_switch_s is not None:
            sys.setswitchinterval(self._prev_switch_s)
            self._prev_switch_s = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown("shutdown" if exc is None else f"fault: {exc!r}")

    # --- diagnostics ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"loops": [lp.status() for lp in self.loops]}

    def counters(self) -> LoopCounters:
        """`ports.LoopStats`: tick counters summed over the loops (monotonic)."""
        ticks = missed = overruns = fallback = 0
        for lp in self.loops:
            ticks += lp.ticks
            missed += lp.missed
            overruns += lp.overruns
            fallback += lp.fallback_ticks
        return LoopCounters(ticks=ticks, missed=missed, overruns=overruns, fallback_ticks=fallback)

    async def _cmd_loops(self, args: dict[str, Any], peer: Peer) -> Any:
        want = args.get("id")
        out = [lp.status() for lp in self.loops if want is None or lp.id == want]
        if want is not None and not out:
            raise CommandError(
                "not_found", f"no loop {want!r} (expected one of: {[lp.id for lp in self.loops]})"
            )
        return out

    def commands(self) -> Mapping[str, Command]:
        return {
            "loops": Command(self._cmd_loops, help="control loops: timing, mode, model, actuator")
        }

    def reload(self, config: Config) -> None:
        """Apply live settings to loops with the same id: the policy (threshold, hysteresis,
        debounce), the active/normal values and the fallback rules. Inputs, model, actuator
        and period need a restart (the daemon names them).

        New fallback rules are checked against the hub's channels first (as at start-up);
        a loop whose new rules name a channel that does not exist keeps its running rules
        and the reload raises a ConfigError naming them (the daemon reports it as needing
        attention, without dropping the other live changes)."""
        by_id = {lp.id: lp for lp in self.loops}
        known: dict[str, list[str]] | None = None
        problems: list[str] = []
        for i, cfg in enumerate(config.loops):
            loop = by_id.get(cfg.id)
            if loop is None:
                continue
            if cfg.fallback != loop.cfg.fallback:
                known = known if known is not None else self._known_channels()
                bad = self._rule_problems(i, cfg, known)
                if bad:
                    problems.extend(bad)
                else:
                    loop.set_fallback(
                        cfg.fallback, [self._stale_s(cfg, r.sensor, config) for r in cfg.fallback]
                    )
                    log.info(
                        "loop_fallback_applied",
                        loop=loop.id,
                        rules=[f"{r.sensor}.{r.channel} {r.stat}" for r in cfg.fallback],
                    )
            loop.cfg = msgspec.structs.replace(
                loop.cfg,
                policy=cfg.policy,
                active_value=cfg.active_value,
                normal_value=cfg.normal_value,
            )
            p, pol = cfg.policy, loop.policy
            pol.hysteresis_ratio = p.hysteresis_ratio
            pol.debouncer.on_ticks = p.on_ticks
            pol.debouncer.off_ticks = p.off_ticks
            if p.threshold is not None:
                pol.threshold = p.threshold
            else:
                loop.forget_runner()  # the manifest threshold is read again on the next tick
        if problems:
            raise ConfigError("fallback rules not applied: " + "; ".join(problems))
