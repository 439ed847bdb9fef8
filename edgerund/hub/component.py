"""The SensorHub component ("hub"): builds every configured sensor, runs its acquisition
task, keeps the latest sample and a ring window per channel, and serves the technician
commands `sensors`, `i2c-scan`, `serial-sniff` and (simulated mode) `sim-inject`.

Public API (docs/sensors.md; the `ports.SampleSource` of loops and telemetry):

    hub.latest(sensor_id, channel) -> Sample | None
    hub.window(sensor_id, channel, n) -> (t_mono[k], values[k])   newest last, copies
    hub.state(sensor_id) -> "starting" | "ok" | "failed" | "disabled"
    hub.channels() -> [(sensor_id, channel, unit), ...]
    hub.subscribe(fn) -> unsubscribe        fn(Sample) on the loop, for every new sample
    hub.resources                           the shared transports (actuators use them too)

Wiring: the composition root chooses the transports (`resources`: the hardware buses and
ports, or the simulated plant's; the hub never decides that itself and never imports
drivers.emulated) and passes the hub its `TaskScope`, its event sink and, in simulated
mode, the `SimControl` view of the plant that `sim-inject` drives.

Life cycle: the constructor builds driver objects (no I/O, so `channels()` is known before
start and a bad driver setting is a start-up error); `__aenter__` spawns one supervised
task per enabled sensor (edgerund/hub/acquire.py) in the hub's scope and returns at once:
a sensor that is absent at start-up is `failed` and re-probed, it never blocks the
daemon's start. `__aexit__` cancels the tasks (each closes its device) and closes the
shared transports.

Subscribers are called synchronously for every sample, so they must be cheap (append to
a buffer); one that raises is counted and logged once, and never stops acquisition.

One cohesive thing (the hub's state per sensor and the technician commands that read it),
hence one module of ~550 lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import msgspec
import structlog

from drivers.base import ChannelInfo, Resources, Sample, SensorConfig
from drivers.errors import DeviceError
from drivers.i2c import scan
from drivers.registry import SensorSpec, sensor_drivers
from edgerund.component import Command, CommandError, Peer
from edgerund.errors import ConfigError
from edgerund.hub.acquire import Acquirer, SensorRuntime, make_slots
from edgerund.hub.resources import TrackingResources
from edgerund.hub.ring import F64, Ring

if TYPE_CHECKING:
    from edgerund.config.schema import Config
    from edgerund.context import TaskScope
    from edgerund.ports import EventSink

log = structlog.get_logger("edgerund.hub")

EMPTY_STATUS: dict[str, object] = {"sensors": []}


class SimControl(Protocol):
    """The simulated plant as `sim-inject` drives it (edgerund/simulation.py)."""

    @property
    def anomaly_kinds(self) -> tuple[str, ...]: ...

    def now_s(self) -> float:
        """The scenario's clock."""
        ...

    def device_for(self, cfg: SensorConfig) -> str | None:
        """The emulated device behind a sensor's config, for a targeted dropout."""
        ...

    def inject(
        self, kind: str, *, start_s: float, duration_s: float, severity: float, sensor: str | None
    ) -> None:
        """Schedule an anomaly; ValueError when the scenario cannot play it."""
        ...


RATE_WINDOW_S = 10.0  # achieved rates are measured over this trailing window


def _driver_name(cfg: SensorConfig) -> str:
    return str(getattr(cfg.__struct_config__, "tag", "") or type(cfg).__name__)


def _where(cfg: SensorConfig, transport: str) -> str:
    bus = getattr(cfg, "bus", None)
    addr = getattr(cfg, "address", None)
    if transport == "i2c" and isinstance(bus, int) and isinstance(addr, int):
        return f"i2c-{bus}@0x{addr:02x}"
    port = getattr(cfg, "port", None)
    if isinstance(port, str):
        unit = getattr(cfg, "unit", None)
        return f"{port} unit {unit}" if isinstance(unit, int) else port
    chip, line = getattr(cfg, "chip", None), getattr(cfg, "line", None)
    if isinstance(chip, str) and isinstance(line, int):
        return f"{chip}:{line}"  # a GPIO input
    if getattr(cfg, "sysfs_root", None) is not None:  # a w1 probe
        return f"w1 {getattr(cfg, 'device', None) or 'auto'}"
    return transport


def _fmt(v: float) -> str:
    """Short human form for the `value` column (exact values are in `channels`)."""
    a = abs(v)
    if not math.isfinite(v):
        return str(v)
    if a >= 1e7 or (0 < a < 1e-3):
        return f"{v:.3e}"
    if a >= 100:
        return f"{v:.1f}"
    return f"{v:.4g}"


class SensorHub:
    name = "hub"

    def __init__(
        self,
        sensors: Sequence[SensorConfig],
        resources: Resources,
        *,
        scope: TaskScope,
        events: EventSink | None = None,
        drivers: Mapping[str, SensorSpec] | None = None,
        sim: SimControl | None = None,
    ) -> None:
        """`drivers` defaults to drivers.registry; tests pass their own specs.

        `sim` is the simulated plant when running simulated (for `sim-inject`), else None.
        """
        self._scope = scope
        self._events = events
        self.resources = TrackingResources(resources)
        self._sim = sim
        specs = dict(drivers if drivers is not None else sensor_drivers())
        by_type = {spec.config_type: spec for spec in specs.values()}
        self._rts: dict[str, SensorRuntime] = {}
        self._acq: dict[str, Acquirer] = {}
        self._read_times: dict[str, Ring] = {}
        self._subs: list[Callable[[Sample], None]] = []
        self._sub_errors = 0
        self._sub_error_logged = False
        self._started = 0
        self._scans: set[int] = set()
        for cfg in sensors:
            spec = by_type.get(type(cfg)) or specs.get(_driver_name(cfg))
            if spec is None:
                raise ConfigError(
                    f"no driver registered for {_driver_name(cfg)!r}; "
                    f"known: {', '.join(sorted(specs))}",
                    path=f"sensors.{cfg.id}",
                )
            if cfg.id in self._rts:
                raise ConfigError(f"duplicate sensor id {cfg.id!r}", path="sensors")
            try:
                sensor = spec.factory(cfg, self.resources)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{spec.name}: {exc}", path=f"sensors.{cfg.id}") from exc
            channels: Sequence[ChannelInfo] = tuple(sensor.channels)
            rt = SensorRuntime(
                config=cfg,
                driver_name=spec.name,
                transport=spec.transport,
                where=_where(cfg, spec.transport),
                sensor=sensor,
                slots=make_slots(channels, max(1, cfg.window)),
            )
            if not cfg.enabled:
                rt.health = type(rt.health)(state="disabled")
            self._rts[cfg.id] = rt
            # read completion times, to report the achieved rate over RATE_WINDOW_S
            cap = int(min(8192, max(16, cfg.rate_hz * RATE_WINDOW_S * 1.5)))
            self._read_times[cfg.id] = Ring(cap)
            self._acq[cfg.id] = Acquirer(rt, self._make_sink(cfg.id), self._publish)

    # -- public API ---------------------------------------------------------------------
    def latest(self, sensor_id: str, channel: str) -> Sample | None:
        rt = self._rts.get(sensor_id)
        if rt is None:
            return None
        slot = rt.slots.get(channel)
        return slot.latest if slot is not None else None

    def window(self, sensor_id: str, channel: str, n: int) -> tuple[F64, F64]:
        rt = self._rts.get(sensor_id)
        slot = rt.slots.get(channel) if rt is not None else None
        if slot is None:
            raise KeyError(f"no channel {sensor_id}.{channel}")
        return slot.ring.window(n)

    def lock_phase(self, sensor_id: str, period_s: float, t0_s: float) -> bool:
        """Put a polled sensor's reads on a control loop's deadline grid `t0_s + k *
        period_s` (time.monotonic): the read of each deadline is made when the loop's
        tick asks for it (`request_read`), the reads in between on the grid (acquire.py,
        phase lock). False (nothing changes) for a stream sensor, which delivers at its
        own pace."""
        acq = self._acq.get(sensor_id)
        if acq is None:
            raise KeyError(f"no sensor {sensor_id!r}")
        if acq.rt.mode != "poll":
            return False
        acq.lock(period_s, t0_s)
        log.info(
            "sensor_phase_locked",
            sensor=sensor_id,
            loop_period_ms=round(period_s * 1000, 3),
            read_period_ms=round(acq.lock_.period_s * 1000, 3) if acq.lock_ else None,
        )
        return True

    def request_read(self, sensor_id: str) -> asyncio.Future[bool] | None:
        """A phase-locked sensor that is "ok": read it now (a loop's tick). The future
        turns True once a read started after the call is stored (False: it failed).
        None when the sensor is not locked or not "ok" (nothing worth waiting for)."""
        acq = self._acq.get(sensor_id)
        if acq is None or acq.lock_ is None or acq.rt.health.state != "ok":
            return None
        return acq.request_read()

    def state(self, sensor_id: str) -> str:
        rt = self._rts.get(sensor_id)
        if rt is None:
            raise KeyError(f"no sensor {sensor_id!r}")
        return rt.health.state

    def channels(self) -> list[tuple[str, str, str]]:
        return [
            (sid, slot.info.name, slot.info.unit)
            for sid, rt in self._rts.items()
            for slot in rt.slots.values()
        ]

    def sensor_ids(self) -> list[str]:
        return list(self._rts)

    def subscribe(self, fn: Callable[[Sample], None]) -> Callable[[], None]:
        self._subs.append(fn)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subs.remove(fn)

        return unsubscribe

    # -- plumbing -----------------------------------------------------------------------
    def _publish(self, kind: str, source: str, **fields: Any) -> None:
        if self._events is not None:
            self._events.publish(kind, source, **fields)

    def _make_sink(self, sensor_id: str) -> Callable[[list[Sample], float], None]:
        subs = self._subs  # the list object is stable; (un)subscribe mutate it in place
        read_times = self._read_times[sensor_id]
        last = [0.0]
        rt = self._rts[sensor_id]
        # A stream device may send an epoch as a burst of frames (GGA+RMC+VTG): count a
        # burst once, so the achieved rate compares with the configured epochs per second.
        min_gap = 0.5 / rt.config.rate_hz if getattr(rt.sensor, "mode", "") == "stream" else 0.0

        def sink(samples: list[Sample], t_mono: float) -> None:
            if t_mono - last[0] > min_gap:  # one entry per read
                last[0] = t_mono
                read_times.push(t_mono, 0.0)
            for fn in subs:
                for s in samples:
                    try:
                        fn(s)
                    except Exception as exc:
                        self._sub_failed(exc)

        return sink

    def _sub_failed(self, exc: Exception) -> None:
        self._sub_errors += 1
        if not self._sub_error_logged:
            self._sub_error_logged = True
            log.error("subscriber_failed", error=repr(exc), exc_info=exc)

    # -- life cycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        for sid, acq in self._acq.items():
            if not acq.rt.config.enabled:
                continue
            self._scope.spawn(sid, acq.run, restart=True)
            self._started += 1
        log.info("hub_started", sensors=self._started, simulated=self._sim is not None)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Stop reading before the devices close (the scope would cancel these tasks after
        # this __aexit__ anyway, but then a read could race the transport's close below).
        await self._scope.aclose()
        for acq in self._acq.values():  # tasks close in `finally`; this is the backstop
            await acq.close()
        with contextlib.suppress(Exception):
            await self.resources.aclose()

    # -- reload (SIGHUP) --------------------------------------------------------------
    LIVE_KEYS = ("rate_hz", "read_timeout_ms", "retries", "fail_after", "reprobe_s")

    def reload(self, config: Config) -> None:
        """Apply live acquisition settings of sensors whose identity did not change.

        rate_hz, read_timeout_ms, retries, fail_after and reprobe_s change in place (from
        the sensor's next read). Anything else (driver keys, window, enabled, sensors
        added or removed) needs a restart: raised as an error naming the sensors, which
        the daemon reports without dropping the live changes already applied.
        """
        new_by_id = {s.id: s for s in config.sensors}
        needs_restart = sorted(set(self._rts) ^ set(new_by_id))
        for sid, rt in self._rts.items():
            new = new_by_id.get(sid)
            if new is None:
                continue
            old = rt.config
            if type(new) is not type(old):
                needs_restart.append(sid)
                continue
            live = {k: getattr(new, k) for k in self.LIVE_KEYS}
            same_otherwise = msgspec.structs.replace(old, **live) == new
            if not same_otherwise:
                needs_restart.append(sid)
                continue
            if any(getattr(old, k) != v for k, v in live.items()):
                self._acq[sid].apply(new)
                log.info("sensor_settings_applied", sensor=sid, **live)
        if needs_restart:
            raise ConfigError(f"sensor changes need a restart: {', '.join(needs_restart)}")

    # -- status -------------------------------------------------------------------------
    def _rate(self, sid: str, now: float) -> float:
        """Reads per second over the trailing RATE_WINDOW_S (or over the history there is)."""
        ts = self._read_times[sid].times_since(now - RATE_WINDOW_S)
        k = int(ts.size)
        if k < 2:
            return 0.0
        oldest = float(ts.min())  # (the method: np.min's wrapper costs more than the work)
        ring_full = len(self._read_times[sid]) == self._read_times[sid].capacity
        if oldest > now - RATE_WINDOW_S + 1.0 and not ring_full:
            # less than a window of history (just started, or just recovered): use the
            # spacing of the reads we have, not the empty part of the window; but a
            # sensor that read a few times and then stopped is not still reading at
            # that pace: once the last read is more than a period old, count the
            # silence since it too
            span = float(ts.max()) - oldest
            dt = max(span, now - oldest - 1.0 / self._rts[sid].config.rate_hz)
            return (k - 1) / dt if dt > 0 else 0.0
        return k / min(RATE_WINDOW_S, now - oldest) if ring_full else k / RATE_WINDOW_S

    def sensor_status(self, sid: str) -> dict[str, Any]:
        rt = self._rts[sid]
        now = time.monotonic()
        chans = []
        parts = []
        for slot in rt.slots.values():
            s = slot.latest
            chans.append(
                {
                    "name": slot.info.name,
                    "unit": slot.info.unit,
                    "value": s.value if s is not None and math.isfinite(s.value) else None,
                    "quality": s.quality.name.lower() if s is not None else None,
                    "age_s": round(now - s.t_mono, 3) if s is not None else None,
                }
            )
            if s is not None:
                parts.append(f"{_fmt(s.value)} {slot.info.unit}".strip())
        c = rt.counters
        driver_counters = getattr(rt.sensor, "counters", None)
        drv = driver_counters if isinstance(driver_counters, dict) else {}
        # Stream drivers count and skip bad frames themselves (the iterator never sees
        # them); polled drivers raise FrameError, which the hub counts (and the driver may
        # count the same event): sum for streams, the larger count for polls.
        drv_frames = int(drv.get("frame_errors", 0) or 0)
        frame_errors = (
            c.frame_errors + drv_frames if rt.mode == "stream" else max(c.frame_errors, drv_frames)
        )
        return {
            "id": sid,
            "driver": rt.driver_name,
            "where": rt.where,
            "state": rt.health.state,
            "value": ", ".join(parts) if parts else None,
            "age_s": round(now - rt.last_read_mono, 3) if rt.last_read_mono else None,
            "rate_hz": rt.config.rate_hz,
            "rate_achieved_hz": round(self._rate(sid, now), 2),
            "read_errors": c.read_errors,
            "frame_errors": frame_errors,
            "timeouts": c.timeouts,
            "overruns": c.overruns,
            "reprobes": c.reprobes,
            "last_error": rt.health.last_error,
            "counters": c.as_dict(),
            "driver_counters": dict(drv),
            "channels": chans,
            # a loop's `fresh` input: reads timed to land just before its ticks
            "phase_lock": None
            if (acq := self._acq[sid]).lock_ is None
            else {
                "read_period_ms": round(acq.lock_.period_s * 1000, 3),
                "reads_per_tick": acq.lock_.per_tick,
                **acq.lock_counters.as_dict(),
            },
        }

    def status(self) -> dict[str, Any]:
        return {"sensors": [self.sensor_status(sid) for sid in self._rts]}

    # -- commands -----------------------------------------------------------------------
    def commands(self) -> Mapping[str, Command]:
        return {
            "sensors": Command(
                self._cmd_sensors, help="every sensor: state, last value, age, rate, errors"
            ),
            "i2c-scan": Command(self._cmd_i2c_scan, help="read-only probe of an I2C bus: {bus: N}"),
            "serial-sniff": Command(
                self._cmd_serial_sniff, help="last raw frames of a port: {port: URL, n: N}"
            ),
            "sim-inject": Command(
                self._cmd_sim_inject,
                mutating=True,
                help="simulated mode: inject an anomaly: {kind, duration_s, severity, sensor}",
            ),
        }

    async def _cmd_sensors(self, args: dict[str, Any], peer: Peer) -> Any:
        rows = []
        for sid in self._rts:
            st = self.sensor_status(sid)
            rows.append(
                {
                    k: st[k]
                    for k in (
                        "id",
                        "driver",
                        "where",
                        "state",
                        "value",
                        "age_s",
                        "rate_hz",
                        "rate_achieved_hz",
                        "read_errors",
                        "frame_errors",
                        "timeouts",
                        "overruns",
                        "last_error",
                    )
                }
            )
        return rows

    async def _cmd_i2c_scan(self, args: dict[str, Any], peer: Peer) -> Any:
        bus_n = args.get("bus")
        if isinstance(bus_n, str) and bus_n.isdigit():
            bus_n = int(bus_n)
        if not isinstance(bus_n, int) or isinstance(bus_n, bool) or not 0 <= bus_n <= 255:
            raise CommandError("bad_args", f"bus: expected an I2C bus number 0..255, got {bus_n!r}")
        if bus_n in self._scans:
            raise CommandError("busy", f"a scan of bus {bus_n} is already running")
        claimed: dict[int, str] = {}
        for sid, rt in self._rts.items():
            if rt.transport == "i2c" and getattr(rt.config, "bus", None) == bus_n:
                addr = getattr(rt.config, "address", None)
                if isinstance(addr, int):
                    claimed[addr] = sid
        try:
            bus = self.resources.i2c_bus(bus_n)
        except (ValueError, OSError) as exc:
            raise CommandError("device_error", f"I2C bus {bus_n}: {exc}") from exc
        if not isinstance(bus, scan.ProbingBus):
            raise CommandError("unsupported", f"I2C bus {bus_n} cannot run probes")
        self._scans.add(bus_n)
        try:
            result = await scan.scan_bus(bus, claimed)
        except (DeviceError, OSError) as exc:
            # the adapter itself failed (no such bus, permission): every address would fail
            raise CommandError("device_error", f"I2C bus {bus_n}: {exc}") from exc
        finally:
            self._scans.discard(bus_n)
        rows = scan.rows(result, claimed)
        for row in rows:
            owner = row.get("sensor")
            if isinstance(owner, str) and owner in self._rts:
                row["state"] = self._rts[owner].health.state
        return rows

    async def _cmd_serial_sniff(self, args: dict[str, Any], peer: Peer) -> Any:
        port_arg = args.get("port")
        n = args.get("n", 20)
        if not isinstance(port_arg, str) or not port_arg:
            raise CommandError(
                "bad_args", f"port: expected a port URL or sensor id, got {port_arg!r}"
            )
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1000:
            raise CommandError("bad_args", f"n: expected 1..1000, got {n!r}")
        url: str = port_arg
        if url not in self.resources.ports and port_arg in self._rts:
            url = str(getattr(self._rts[port_arg].config, "port", port_arg))
        port = self.resources.ports.get(url)
        if port is None:
            known = sorted(self.resources.ports)
            raise CommandError(
                "not_found",
                f"no serial port {port_arg!r} in use; in use: "
                f"{', '.join(known) if known else 'none'}",
            )
        recent = getattr(port, "recent_frames", None)
        if recent is None:
            raise CommandError("unsupported", f"port {url} does not record frames")
        from drivers.serial.port import frames_to_rows

        frames: list[tuple[float, bytes]] = recent(n)
        return frames_to_rows(frames)

    async def _cmd_sim_inject(self, args: dict[str, Any], peer: Peer) -> Any:
        sim = self._sim
        if sim is None:
            raise CommandError(
                "not_simulating",
                "sim-inject works only in simulated mode (edgerund run --simulate)",
            )
        kind = args.get("kind")
        if not isinstance(kind, str) or kind not in sim.anomaly_kinds:
            raise CommandError(
                "bad_args", f"kind: expected one of {', '.join(sim.anomaly_kinds)}, got {kind!r}"
            )
        sensor = args.get("sensor")
        if isinstance(sensor, str) and sensor in self._rts:
            sensor = sim.device_for(self._rts[sensor].config)
        target = sensor if isinstance(sensor, str) else None
        try:
            duration = float(args.get("duration_s", 30.0))
            severity = float(args.get("severity", 1.0))
            start = float(sim.now_s()) + float(args.get("start_in_s", 0.0))
            sim.inject(kind, start_s=start, duration_s=duration, severity=severity, sensor=target)
        except (TypeError, ValueError) as exc:
            raise CommandError("bad_args", str(exc)) from exc
        log.info(
            "sim_anomaly_injected",
            kind=kind,
            start_s=round(start, 3),
            duration_s=duration,
            severity=severity,
            sensor=target,
        )
        self._publish(
            "sim.inject",
            "hub",
            anomaly=kind,
            start_s=start,
            duration_s=duration,
            severity=severity,
            sensor=target,
        )
        return {
            "kind": kind,
            "start_s": round(start, 3),
            "duration_s": duration,
            "severity": severity,
            "sensor": target,
        }


def build(
    cfg: Config,
    *,
    resources: Resources,
    scope: TaskScope,
    events: EventSink,
    sim: SimControl | None = None,
) -> SensorHub:
    """The hub is always built: even with no sensors, `i2c-scan` helps wire the first.

    `resources` (hardware or simulated) is the composition root's choice."""
    return SensorHub(list(cfg.sensors), resources, scope=scope, events=events, sim=sim)
