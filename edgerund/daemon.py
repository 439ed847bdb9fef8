"""The composition root: build every component from the config, wire it, run it.

Wiring. `Daemon._start` constructs each component explicitly with exactly the ports
(edgerund/ports.py) of the peers it needs, in dependency order:

    identity -> hub -> update slots -> models -> loops -> updates -> twin -> telemetry -> diag

identity is the `Signer` of telemetry and of device calibrations (updates), the
`Measurer` of models and the source of the
anti-rollback `Counter`; the hub is the `SampleSource` of loops and telemetry; the slot
repository is the `SlotSource` of models; models are the `ModelHost` of loops and updates
and the `Calibrator` of updates;
loops are the `LoopStats` of updates' probation; the one `RemoteCommands` router takes
remote (MQTT) commands from the components that serve them and is dispatched by telemetry.
Before telemetry (the only dispatcher of `cmd/*`) starts, the root installs the twin's
`CommandGate` on that router, so every remote request is operator-authenticated and every
admitted reply gateway-signed (docs/twin.md); the twin component gets the root's typed
callables (status, reload, apply_config, health) for its commands, reported and desired
state. A peer that is not configured is passed as None. Nothing is looked up by name, nothing
polls for a peer, and every peer a component uses has been entered before it.

This module is also the only place that chooses the hardware or the simulated plant:
`--simulate` (or `simulation.enabled`) builds edgerund/simulation.py's `Simulation`, whose
transports the hub and the actuators use and which adds the emulated actuator driver;
otherwise the hub gets `HardwareResources` and the production driver registry.

Tasks. Each component that runs background tasks gets its own `TaskScope` from the
`Supervisor` (edgerund/context.py), entered before the component and left after it, so
leaving a component cancels whatever tasks it still has. The root's own tasks (loop-lag
monitor, status line, metrics textfile, SIGHUP reload) live in the "daemon" scope.

Start-up (edgerund/main.py has validated the config, checked the state directory and
started every thread of the default executor): enter the components in the order above, each an async context manager that opens its resources;
then the diagnostics socket; then `gc.collect(1)` and `gc.freeze()` (start-up objects never get scanned again,
which keeps full collections off the control loops); then the loops, entered warm and held,
are released (their first tick comes after that collection, not during it); then `READY=1`. Components exit in
reverse order, so loops drive their actuators to the safe state while buses are still open
and telemetry flushes its spool last.

Status: each component reports its own section(s) (`status()`); for a component that is
not configured the root emits its module's `EMPTY_STATUS`, so `status` always carries the
keys DESIGN.md promises without this module knowing any component's fields.

Crash policy (documented in README): a component's background task that crashes is logged
with its name and restarted with capped, jittered backoff when the component declares the
task restartable (acquisition, uplink, inbox watcher); where in-process recovery is unsafe
(a control loop whose actuator state is unknown, the TPM worker) the task is declared
fatal and the daemon exits 1 so systemd restarts the whole service.

Watchdog: edgerund/looplag.py (WATCHDOG=1 only while the event loop's lag is under its limit).

SIGHUP: the file is re-read (with the applied desired patch merged over it) and validated
off the loop; on error the running config stays and the reason is logged; on success
`apply_config` (also the desired state's path) diffs the configs key by key
(config/diff.py): live settings are applied through each component's `reload()`, every
other changed key is named as needing a restart (log, reply, reported state).

The process around it (config load, the state directory check, the applied desired state
re-verified from its signature, the event loop, exit codes) is edgerund/main.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import hashlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import structlog

from drivers.base import Resources
from drivers.registry import ActuatorSpec, actuator_drivers
from edgerund import __version__, logs, taskdump, testclock
from edgerund.component import Command, Component, Peer
from edgerund.config import diff as config_diff
from edgerund.config.schema import Config
from edgerund.context import EventBus, FatalComponentError, Supervisor, TaskScope
from edgerund.control import component as control_component
from edgerund.diag import DiagServer
from edgerund.errors import CommandError, ConfigError
from edgerund.hub import component as hub_component
from edgerund.hub.component import SimControl
from edgerund.identity import component as identity_component
from edgerund.inference import component as inference_component
from edgerund.looplag import LoopLagMonitor
from edgerund.remote import RemoteCommands
from edgerund.sdnotify import Notifier
from edgerund.telemetry import component as telemetry_component
from edgerund.telemetry.component import build as telemetry_build
from edgerund.toolkit import prometheus
from edgerund.twin import component as twin_component
from edgerund.twin.applier import DesiredApplier, Health, config_with_patch
from edgerund.twin.desired import Desired
from edgerund.twin.gate import CommandGate, provisioned_keyring
from edgerund.twin.pins import Pins
from edgerund.updates import component as updates_component
from edgerund.updates.counter import counter_for
from edgerund.updates.repository import build_slots

log = structlog.get_logger("edgerund")

# The sections `status` always carries (DESIGN.md), each owned by its component's module:
# emitted as they are when the component is not configured, replaced by its own otherwise.
EMPTY_STATUS: tuple[Mapping[str, object], ...] = (
    identity_component.EMPTY_STATUS,
    hub_component.EMPTY_STATUS,
    control_component.EMPTY_STATUS,
    inference_component.EMPTY_STATUS,
    telemetry_component.EMPTY_STATUS,
    twin_component.EMPTY_STATUS,
)

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure: systemd restarts us
EXIT_CONFIG = 2  # needs a human (bad config, refused start): RestartPreventExitStatus=2


# A component's reload: applies what may change live; async where it must do I/O (the
# identity re-binds the config digest through the TPM).
Reloader = Callable[[Config], Awaitable[None] | None]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sensors_ok(status: dict[str, Any]) -> frozenset[str]:
    """The ids of the sensors `status` reports ok."""
    return frozenset(
        str(s.get("id"))
        for s in status.get("sensors") or []
        if isinstance(s, dict) and s.get("state") == "ok"
    )


def _resources(
    cfg: Config, simulate: bool
) -> tuple[Resources, SimControl | None, Mapping[str, ActuatorSpec]]:
    """Hardware, or the simulated plant: the transports, `sim-inject`'s view of the plant,
    and the actuator drivers a loop may name."""
    if simulate:
        from edgerund.simulation import Simulation  # loads drivers.emulated: simulation only

        sim = Simulation(cfg)
        return sim.resources, sim, {**actuator_drivers(), **sim.actuators}
    from edgerund.hub.resources import HardwareResources

    return HardwareResources(), None, actuator_drivers()


class Daemon:
    def __init__(
        self,
        config_path: Path,
        config: Config,
        *,
        simulate: bool = False,
        applied: Desired | None = None,
        offered: Desired | None = None,
    ) -> None:
        self.config_path = config_path
        self.applied = applied  # the desired state verified at start-up (twin/applier.py)
        # a newer authenticated document whose config fragment was not applied: only its
        # model targets count (the pins)
        self.offered = offered
        self.applier: DesiredApplier | None = None
        self.config = config
        self.simulate = simulate
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self._census: Any = None  # heapcensus.HeapCensus, made by the test-only hook
        self.notifier = Notifier()
        self.stop_event = asyncio.Event()
        self.fatal: FatalComponentError | None = None
        self.supervisor = Supervisor(self._on_fatal)
        self.scope = self.supervisor.scope("daemon")
        self.events = EventBus()
        self.router = RemoteCommands()
        self.lag = LoopLagMonitor(
            config.daemon.loop_lag_interval_ms / 1e3,
            config.daemon.watchdog_lag_limit_ms / 1e3,
            self.notifier,
        )
        # Entered components in start-up order, and the ones that apply a SIGHUP live.
        self.components: list[Component] = []
        self._reloaders: list[tuple[str, Reloader]] = []
        self._all_commands: dict[str, Command] = {}
        self._diag: DiagServer | None = None
        self._loops: control_component.LoopsComponent | None = None
        self.reloads = 0
        self.reload_errors = 0
        self.restart_needed: list[str] = []

    def _on_fatal(self, err: FatalComponentError) -> None:
        if self.fatal is None:
            self.fatal = err
        self.stop_event.set()

    # ------------------------------------------------------------------ wiring

    async def _enter(
        self,
        stack: contextlib.AsyncExitStack,
        comp: Component,
        scope: TaskScope | None = None,
        reload: Reloader | None = None,
    ) -> None:
        """Enter `comp` (after its task scope, which is left after it)."""
        if scope is not None:
            await stack.enter_async_context(scope)
        await stack.enter_async_context(comp)
        self.components.append(comp)
        if reload is not None:
            self._reloaders.append((comp.name, reload))

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Build and enter every component in dependency order (module docstring)."""
        cfg = self.config
        sup = self.supervisor
        events = self.events

        identity = identity_component.build(cfg, config_path=self.config_path)
        await self._enter(stack, identity, reload=identity.reload)
        # The anti-rollback counter depends on the identity alone (TPM NV or a file).
        counter = counter_for(cfg, identity)
        if self.stop_event.is_set():
            return

        resources, sim, actuators = _resources(cfg, self.simulate or cfg.simulation.enabled)
        hub_scope = sup.scope("hub")
        hub = hub_component.build(cfg, resources=resources, scope=hub_scope, events=events, sim=sim)
        await self._enter(stack, hub, hub_scope, hub.reload)
        if self.stop_event.is_set():
            return

        # Device calibrations (X+cal.N slots) are verified with the identity's public key.
        slots = build_slots(cfg, events=events, device_key=identity.public_key_pem())
        if slots is not None:
            await stack.enter_async_context(slots)

        models_scope = sup.scope("models")
        models = inference_component.build(
            cfg, slots=slots, measurer=identity, events=events, scope=models_scope
        )
        if models is not None:
            await self._enter(stack, models, models_scope, reload=models.reload)
        if self.stop_event.is_set():
            return

        loops_scope = sup.scope("loops")
        loops = control_component.build(
            cfg,
            samples=hub,
            resources=hub.resources,
            models=models,
            events=events,
            scope=loops_scope,
            actuators=actuators,
            hold=True,
        )
        self._loops = loops
        if loops is not None:
            await self._enter(stack, loops, loops_scope, loops.reload)
        if self.stop_event.is_set():
            return

        updates: updates_component.UpdatesComponent | None = None
        # The twin's model targets pin their models against local updates (twin/pins.py);
        # seeded from the newest desired document verified at start-up (applied, or
        # offered with a refused or reverted config fragment) so that a restart without
        # the broker does not lift them, then kept by the twin's model targets.
        pins = Pins()
        pinning = self.offered or self.applied
        if slots is not None and pinning is not None and cfg.twin.enabled:
            pins.seed(
                pinning.version,
                pinning.models,
                managed=slots.records,
                max_bytes=int(cfg.updates.bundle_max_mb * 1024 * 1024),
            )
        if slots is not None:
            updates_scope = sup.scope("updates")
            updates = updates_component.build(
                cfg,
                slots=slots,
                scope=updates_scope,
                events=events,
                counter=counter,
                models=models,
                loops=loops,
                router=self.router,
                drift=models,
                calibrator=models,
                signer=identity,
                pins=pins if cfg.twin.enabled else None,
            )
            await self._enter(stack, updates, updates_scope)
            if self.stop_event.is_set():
                return

        # Every remote request is authenticated from here on (docs/twin.md): the gate is
        # installed before telemetry, the only dispatcher of `cmd/*`, starts.
        if slots is not None:
            keyring_now = lambda: slots.keyring  # noqa: E731 - the verified, rotating keyring
        else:
            fixed = await asyncio.to_thread(provisioned_keyring, cfg)
            keyring_now = lambda: fixed  # noqa: E731
        gate = CommandGate(
            gateway=cfg.gateway.id,
            keyring=keyring_now,
            signer=identity,
            window_s=cfg.twin.command_window_s,
            nonce_file=Path(cfg.paths.state_dir) / "twin" / "nonces.json",
        )
        if gate.nonces is not None:  # the nonces seen before a restart stay refused
            await gate.nonces.load()
            self.scope.spawn("nonces", gate.nonces.run)
        self.router.guard(gate)
        if cfg.twin.enabled:
            twin_scope = sup.scope("twin")
            self.applier = DesiredApplier(
                cfg=cfg,
                config_path=self.config_path,
                keyring=keyring_now,
                apply=self.apply_config,
                current=lambda: self.config,
                health=self.health,
                notify=lambda: None,
                applied=self.applied,
            )
            twin = twin_component.TwinComponent(
                cfg,
                gate=gate,
                router=self.router,
                identity=identity,
                status=self.status,
                reload=self.reload,
                config_digest=self.config_digest,
                restart_needed=lambda: list(self.restart_needed),
                applier=self.applier,
                current=lambda: self.config,
                scope=twin_scope,
                updates=updates,
                pins=pins,
            )
            await self._enter(stack, twin, twin_scope)

        telemetry_scope = sup.scope("telemetry")
        telemetry = telemetry_build(
            cfg,
            scope=telemetry_scope,
            events=events,
            samples=hub,
            signer=identity,
            router=self.router,
        )
        if telemetry is not None:
            await self._enter(stack, telemetry, telemetry_scope)

    def config_digest(self) -> str:
        """SHA-256 (16 hex) of the effective config (file and applied twin fragments)."""
        return hashlib.sha256(msgspec.json.encode(self.config)).hexdigest()[:16]

    # ------------------------------------------------------------------ commands

    def _commands(self) -> dict[str, Command]:
        cmds: dict[str, Command] = {
            "status": Command(self._cmd_status, help="summary of every component"),
            "log": Command(self._cmd_log, help="recent log events: args n, level"),
            "help": Command(self._cmd_help, help="list commands"),
            "ping": Command(self._cmd_ping, help="liveness check"),
            "metrics": Command(self._cmd_metrics, help="Prometheus text exposition"),
            "tasks": Command(
                self._cmd_tasks, help="what every asyncio task waits on (a stuck component)"
            ),
            "reload": Command(
                self._cmd_reload, mutating=True, help="re-read the config file (as SIGHUP)"
            ),
        }
        if os.environ.get("EDGERUND_TEST_HOOKS") == "1":
            # Test-only: block the event loop on purpose (watchdog tests). Never enabled
            # by a config key, only by the environment of a test process.
            cmds["test-block-loop"] = Command(self._cmd_test_block, mutating=True)
            # Test-only: step this process's wall clock (NTP-like correction) without
            # touching the host's clock (which needs CAP_SYS_TIME and breaks the machine).
            cmds["test-clock-step"] = Command(self._cmd_test_clock_step, mutating=True)
            # Test-only: live objects by type and, under tracemalloc, what grew since the
            # first call (leak hunts in the soak; edgerund/heapcensus.py).
            cmds["test-heap"] = Command(self._cmd_test_heap, mutating=True)
        for comp in self.components:
            for name, cmd in comp.commands().items():
                if name in cmds:
                    raise RuntimeError(f"diagnostics command {name!r} registered twice")
                cmds[name] = cmd
        self._all_commands = cmds
        return cmds

    def status(self) -> dict[str, Any]:
        cfg = self.config
        out: dict[str, Any] = {
            "version": __version__,
            "gateway": {
                "id": cfg.gateway.id,
                "site": cfg.gateway.site,
                "hardware_id": cfg.gateway.hardware_id,
                "labels": dict(cfg.gateway.labels),
            },
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "simulate": self.simulate,
            "config_path": str(self.config_path),
        }
        for empty in EMPTY_STATUS:
            out.update(copy.deepcopy(empty))
        out["supervisor"] = {"restarts": dict(self.supervisor.restarts)}
        out["reloads"] = {"ok": self.reloads, "failed": self.reload_errors}
        out.update(self.lag.status())
        out["asyncio_tasks"] = len(asyncio.all_tasks())
        for comp in self.components:
            try:
                section = comp.status()
            except Exception as exc:  # a broken status must not hide the others
                log.exception("status_failed", component=comp.name)
                section = {f"{comp.name}_error": repr(exc)}
            out.update(section)
        if self._diag is not None:
            out.update(self._diag.status())
        return out

    async def _cmd_status(self, args: dict[str, Any], peer: Peer) -> Any:
        return self.status()

    async def _cmd_log(self, args: dict[str, Any], peer: Peer) -> Any:
        n = args.get("n", 50)
        if not isinstance(n, int) or n < 0:
            raise CommandError("bad_args", f"n must be a non-negative integer, got {n!r}")
        level = args.get("level")
        return logs.RING.tail(min(n, 10_000), level if isinstance(level, str) else None)

    async def _cmd_help(self, args: dict[str, Any], peer: Peer) -> Any:
        return {
            name: {"help": c.help, "mutating": c.mutating}
            for name, c in sorted(self._all_commands.items())
        }

    async def _cmd_metrics(self, args: dict[str, Any], peer: Peer) -> Any:
        return {"text": prometheus.render(self.status())}

    async def _metrics_textfile(self) -> None:
        """Write the metrics for node_exporter's textfile collector: temp file + rename
        (the collector must never read a half-written file), off the event loop."""
        while True:
            cfg = self.config.metrics
            if cfg.textfile:
                text = prometheus.render(self.status())
                await asyncio.to_thread(_write_atomic, Path(cfg.textfile), text)
            await asyncio.sleep(max(1.0, cfg.interval_s))

    async def _cmd_ping(self, args: dict[str, Any], peer: Peer) -> Any:
        return {"pong": True, "privileged": peer.privileged, "uid": peer.uid}

    async def _cmd_test_block(self, args: dict[str, Any], peer: Peer) -> Any:
        seconds = float(args.get("seconds", 1.0))
        time.sleep(seconds)  # noqa: ASYNC251 - deliberately blocking: the point of this hook
        return {"blocked_s": seconds}

    async def _cmd_test_clock_step(self, args: dict[str, Any], peer: Peer) -> Any:
        try:
            offset = float(args.get("offset_s", 0.0))
        except (TypeError, ValueError) as exc:
            raise CommandError("bad_args", f"offset_s: expected a number: {exc}") from exc
        return {"offset_s": testclock.step(offset)}

    async def _cmd_tasks(self, args: dict[str, Any], peer: Peer) -> Any:
        return taskdump.dump()

    async def _cmd_test_heap(self, args: dict[str, Any], peer: Peer) -> Any:
        # On the loop on purpose: a census from another thread races the objects it counts.
        # Imported here: tracemalloc has no business in a production start-up.
        from edgerund.heapcensus import HeapCensus

        if self._census is None:
            self._census = HeapCensus()
        return self._census.take(int(args.get("top", 30)))

    async def _cmd_reload(self, args: dict[str, Any], peer: Peer) -> Any:
        ok, message = await self.reload()
        if not ok:
            raise CommandError("config_invalid", message)
        return {"reloaded": True, "message": message}

    # ------------------------------------------------------------------ reload

    async def reload(self) -> tuple[bool, str]:
        """Re-read the file (with the applied desired patch over it) and apply it."""
        patch, version = self.overlay()
        try:
            new = await asyncio.to_thread(config_with_patch, self.config_path, patch, version)
        except ConfigError as exc:
            self.reload_errors += 1
            log.error("config_reload_failed", reason=str(exc), kept="running config")
            return False, str(exc)
        restart_needed = await self.apply_config(new)
        msg = "applied" + (
            f"; restart needed for: {', '.join(restart_needed)}" if restart_needed else ""
        )
        return True, msg

    def overlay(self) -> tuple[dict[str, Any], int]:
        """The applied desired patch (view form) and its version; ({}, 0) without one."""
        a = self.applied
        if self.applier is not None:
            a = self.applier.pending or self.applier.applied
        return (a.config, a.version) if a is not None else ({}, 0)

    async def apply_config(self, new: Config) -> list[str]:
        """The reload path (SIGHUP, `reload`, desired state): every changed key is applied
        live by its component or named, in the log, the reply and the reported state, as
        needing a restart (edgerund/config/diff.py)."""
        old = self.config
        if self.simulate and not new.simulation.enabled:  # --simulate is not in the file
            new.simulation.enabled = True
        live, restart_needed = config_diff.split(config_diff.changes(old, new))
        self.config = new
        logs.set_level(new.logging.level)
        logs.RING.resize(new.logging.ring_size)
        for name, apply in self._reloaders:
            try:
                pending = apply(new)
                if pending is not None:
                    await pending
            except Exception as exc:
                log.exception("component_reload_failed", component=name)
                restart_needed.append(f"{name} ({exc})")
        self.reloads += 1
        self.restart_needed = restart_needed
        log.info("config_reloaded", applied_live=live, restart_needed=restart_needed)
        return restart_needed

    def health(self) -> Health:
        """What a desired state's probation compares (twin/applier.py)."""
        st = self.status()
        loops = st.get("loops") or []
        tel = st.get("telemetry") or {}
        return Health(
            missed_ticks=sum(int(lp.get("missed") or 0) for lp in loops if isinstance(lp, dict)),
            sensors_ok=_sensors_ok(st),
            connected=bool(tel.get("connected")),
        )

    # ------------------------------------------------------------------ run

    def _status_line(self) -> str:
        st = self.status()
        tel = st.get("telemetry") or {}
        ok, sensors = len(_sensors_ok(st)), len(st.get("sensors") or [])
        return (
            f"{ok}/{sensors} sensors ok, {len(st.get('loops') or [])} loops, "
            f"{len(st.get('models') or [])} models, uplink "
            f"{'connected' if tel.get('connected') else 'offline'}, "
            f"backlog {tel.get('backlog_batches', 0)}, lag {st['loop_lag_ms']:.1f} ms"
        )

    async def _status_reporter(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            self.notifier.notify(STATUS=self._status_line())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        cfg = self.config
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        started = time.monotonic()
        try:
            return await self._run_components(cfg, started)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.notifier.close()

    def _on_hup(self) -> None:
        with contextlib.suppress(RuntimeError):  # before start or after stop: nothing to do
            self.scope.spawn("reload", self._reload_task)

    async def _reload_task(self) -> None:
        await self.reload()

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if not self.stop_event.is_set():
            log.info("stopping", signal=sig.name)
            self.notifier.notify(STOPPING=1, STATUS=f"stopping on {sig.name}")
        self.stop_event.set()

    async def _run_components(self, cfg: Config, started: float) -> int:
        async with asyncio.TaskGroup() as tg:
            self.supervisor.attach(tg)
            exit_code = EXIT_OK
            stack = contextlib.AsyncExitStack()
            try:
                await stack.__aenter__()
                await stack.enter_async_context(self.scope)
                await self._start(stack)
                commands = self._commands()
                if cfg.diag.enabled:
                    diag = DiagServer(
                        cfg.diag.socket,
                        commands,
                        mode=cfg.diag.mode,
                        group=cfg.diag.group,
                        max_request_bytes=cfg.diag.max_request_bytes,
                        idle_timeout_s=cfg.diag.idle_timeout_s,
                        max_clients=cfg.diag.max_clients,
                    )
                    await stack.enter_async_context(diag)
                    self._diag = diag
                self.scope.spawn("loop-lag", self.lag.run)
                self.scope.spawn("status-line", self._status_reporter)
                self.scope.spawn("metrics-textfile", self._metrics_textfile)
                # Young generations only: a full collection here freed 0 objects of ~55k
                # and cost 50-130 ms of start-up (measured, README "Start-up"); whatever
                # cyclic start-up garbage is left is frozen with the rest, bounded.
                gc.collect(1)
                gc.freeze()
                if self._loops is not None:  # warm and held since they were entered
                    self._loops.release()
                ready_s = time.monotonic() - started
                self.notifier.notify(READY=1, STATUS=self._status_line())
                log.info(
                    "ready",
                    version=__version__,
                    ready_s=round(ready_s, 3),
                    components=[c.name for c in self.components],
                    simulate=self.simulate,
                    config=str(self.config_path),
                    config_sha256=hashlib.sha256(self.config_path.read_bytes()).hexdigest()[:16]
                    if self.config_path.exists()
                    else None,
                )
                await self.stop_event.wait()
            except BaseException:
                await self._close(stack, cfg)
                raise
            else:
                clean = await self._close(stack, cfg)
                if self.fatal is not None:
                    log.error(
                        "exiting_after_fatal_failure",
                        task=self.fatal.task_name,
                        error=repr(self.fatal.exc),
                    )
                    exit_code = EXIT_FAILURE
                elif not clean:
                    exit_code = EXIT_FAILURE
            await self.supervisor.cancel_all()
        return exit_code

    async def _close(self, stack: contextlib.AsyncExitStack, cfg: Config) -> bool:
        """Exit every component within the shutdown timeout. True if it was orderly."""
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(cfg.daemon.shutdown_timeout_s):
                await stack.aclose()
        except TimeoutError:
            log.error("shutdown_timeout", timeout_s=cfg.daemon.shutdown_timeout_s)
            return False
        except Exception:
            log.exception("shutdown_error")
            return False
        log.info("stopped", shutdown_ms=round((time.monotonic() - t0) * 1e3, 1))
        return True
