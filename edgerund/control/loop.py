"""One control loop: hub windows -> model (or fallback rules) -> policy -> actuator, on time.

Theory of operation
-------------------
`ControlLoop.run()` is the loop's task. It waits for each absolute deadline with
`scheduler.sleep_until` (sleep on the event loop, then spin the last `spin_us`), runs one
tick, then `Schedule.advance()` skips any deadline the tick overran (counted as missed).
A tick does, in order, all of it on the event loop:

0. **Fresh inputs.** When the loop starts, each input marked `fresh` has its (polled)
   sensor phase-locked by the hub to the loop's deadline grid (edgerund/hub/acquire.py,
   phase lock), and every tick has that sensor read for it: by default the tick asks for
   the read on waking and waits for it (at most a quarter of the period), so it decides
   on a sample taken just after its deadline; when those waits get slow (a loaded
   daemon) the loop asks `lead` ahead of the deadline instead and does not wait
   (edgerund/control/fresh.py). `fresh.late` counts ticks that decided without their read.
1. **Inputs.** For each configured input, `hub.window(sensor, channel, window)` for every
   channel, written column by column into a buffer preallocated at start-up (no per-tick
   array growth). An input is *unusable* when its sensor is not "ok", a channel has fewer
   samples than the window, its newest sample is older than `stale_after_ms`, or a value
   is not finite. The reason is kept, verbatim, for `status`. The samples' timestamps
   (`t_mono`, stamped by the hub at each read) are kept too, one array per input (its
   channels come from the same reads): the runner resamples a windowed input on them, so
   a busy CPU's late or skipped reads do not change what the model sees.
2. **Model.** `models.runner(name)` is looked up on *every* tick, so a swap by the models
   component takes effect between two ticks and never in the middle of one. When the runner
   object changes, its manifest's input ABI is checked against the loop's inputs once (a
   mismatch makes the model unusable with a reason naming both sides). The runner is
   called inline: the reference model takes ~20 us here, an executor hop costs more;
   a runner the models component measured over its latency budget (`inline` false) is
   awaited on its own thread instead (`infer_async`).
   A fault, NaN or Inf output is a model fault.
3. **Fallback.** Only when the model path is unusable: the rules' windows are fetched and
   checked for freshness the same way and evaluated (pure, edgerund/control/policy.py).
4. **Policy.** `LoopPolicy.step()` picks the mode (model | fallback | safe), applies
   hysteresis and debounce and names the output (active | normal | safe).
5. **Actuation.** The output's value is written when it differs from the last value
   written (or every `refresh_ms`). A write that fails or exceeds `write_timeout_ms` is
   counted, logged once per failure streak, and followed by an attempt to write the safe
   value; the next tick tries again.
6. **Figures and events.** Tick lateness, sample age at decision, decision-to-actuation,
   sample-to-actuation and inference time go into fixed-bucket histograms; anomaly start
   and end, and every mode change, are published on the event bus for telemetry and the
   log.

Figures (all on `time.monotonic()`, the clock the hub stamps samples with):
- lateness = wake-up - deadline;
- sample_age = decision time - the newest sample the decision used (any input; each
  input's own freshness is enforced by `stale_after_ms`);
- actuation = write done - decision time (ticks that write);
- latency (sample-to-actuation) = write done - that newest sample (ticks that write).

An unexpected exception in a tick (a bug, not a device fault) drives the actuator to its
safe state and is re-raised: the component runs loops as non-restartable tasks, so the
daemon exits and systemd restarts it rather than running a loop in an unknown state.

One cohesive thing (one loop's tick: inputs, model, rules, policy, actuation and its
figures, which share the tick's state), hence one module of ~650 lines.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import structlog

from drivers.base import ActuatorDriver
from edgerund.control.config import FallbackRuleConfig, LoopConfig, actuator_driver_name
from edgerund.control.fresh import FreshPolicy
from edgerund.control.histogram import Histogram
from edgerund.control.policy import Decision, LoopPolicy, Mode, Observation, Rule, evaluate_rules
from edgerund.control.scheduler import Clock, Schedule, Sleep, effective_spin_s, run_schedule
from edgerund.ports import LoopSamples

log = structlog.get_logger("edgerund.control")

F64 = npt.NDArray[np.float64]


class RunnerLike(Protocol):
    manifest: Any

    def infer(self, inputs: Mapping[str, np.ndarray]) -> Any: ...  # (+ times=... optionally)


class ModelsLike(Protocol):
    def runner(self, name: str) -> Any: ...


Publish = Callable[..., Any]
STATUS_CACHE_S = 0.25  # histogram summaries in `status` are at most this old
WARM_RUNS = 20  # start-up passes over the tick's code (CPython specialises after a few)


def _field(obj: Any, name: str, default: Any = None) -> Any:
    """Read a manifest field whether the manifest is an object or a mapping."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


@dataclass
class _Input:
    name: str
    sensor: str
    channels: tuple[str, ...]
    window: int
    stale_s: float
    buf: F64  # (window, channels): preallocated, reused every tick
    tbuf: F64  # (window,): the samples' t_mono (first channel's), reused every tick
    dtype: Any = np.float32
    shape: tuple[int, ...] | None = None  # the manifest's shape, when reshaping is needed
    feed: np.ndarray | None = None  # the array handed to the model (buf cast/reshaped)


@dataclass
class _RuleInput:
    rule: Rule
    sensor: str
    channel: str
    stale_s: float


def _rule_inputs(rules: Sequence[FallbackRuleConfig], stale_s: Sequence[float]) -> list[_RuleInput]:
    return [
        _RuleInput(
            Rule(
                name=f"{r.sensor}.{r.channel}",
                stat=r.stat,
                samples=r.samples,
                above=r.above,
                below=r.below,
            ),
            r.sensor,
            r.channel,
            stale,
        )
        for r, stale in zip(rules, stale_s, strict=True)
    ]


def abi_mismatch(manifest: Any, inputs: Sequence[_Input]) -> str | None:
    """Why the manifest's declared inputs do not fit the loop's inputs (None: they fit).

    The loop supplies (window, channels) arrays; a declared shape fits when it equals that,
    or has the same number of elements (e.g. (1, 256, 3), (3,) for three scalars).
    """
    declared = _field(manifest, "inputs", None)
    if declared is None:
        return "manifest declares no inputs"
    by_name: dict[str, Any] = {}
    for d in declared:
        by_name[str(_field(d, "name"))] = d
    ours = {i.name for i in inputs}
    missing = sorted(set(by_name) - ours)
    extra = sorted(ours - set(by_name))
    if missing or extra:
        return (
            f"manifest inputs {sorted(by_name)} vs loop inputs {sorted(ours)}"
            + (f" (loop lacks {missing})" if missing else "")
            + (f" (model does not take {extra})" if extra else "")
        )
    for i in inputs:
        shape = tuple(int(x) for x in (_field(by_name[i.name], "shape") or ()))
        have = (i.window, len(i.channels))
        if math.prod(shape) != math.prod(have):
            return (
                f"input {i.name!r}: manifest shape {list(shape)} vs loop window "
                f"{i.window} x {len(i.channels)} channel(s)"
            )
    return None


def _accepts_times(runner: Any) -> bool:
    """Whether `runner.infer` takes sample timestamps (`times=`; ModelRunner does, a
    runner written against the older one-argument API does not)."""
    try:
        params = inspect.signature(runner.infer).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "times" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class ControlLoop:
    """A deadline-driven loop. Construct, `await start()`, run `run()` as a task."""

    def __init__(
        self,
        cfg: LoopConfig,
        *,
        hub: LoopSamples,
        models: ModelsLike | None,
        publish: Publish,
        actuator: ActuatorDriver | None,
        input_stale_s: Mapping[str, float],
        rule_stale_s: Sequence[float],
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        hold: bool = False,
    ) -> None:
        """`hold`: `run()` waits for `release()` before its first deadline."""
        self.cfg = cfg
        self.hold = hold
        self._go = asyncio.Event()
        self.id = cfg.id
        self.hub = hub
        self.models = models
        self.publish = publish
        self.actuator = actuator
        self.actuator_driver = actuator_driver_name(cfg.actuator) if cfg.actuator else None
        self.clock = clock
        self.sleep = sleep
        self.period_s = cfg.period_ms / 1000.0
        self.spin_s = effective_spin_s(cfg.spin_us / 1e6, self.period_s)
        self.safe_value = cfg.resolved_safe_value()
        self.write_timeout_s = (cfg.actuator.write_timeout_ms / 1000.0) if cfg.actuator else 1.0
        self.refresh_s = None if cfg.refresh_ms is None else cfg.refresh_ms / 1000.0

        self.inputs = [
            _Input(
                name=i.name,
                sensor=i.sensor,
                channels=tuple(i.channels),
                window=i.window,
                stale_s=input_stale_s[i.name],
                buf=np.zeros((i.window, len(i.channels)), dtype=np.float64),
                tbuf=np.zeros(i.window, dtype=np.float64),
            )
            for i in cfg.inputs
        ]
        self.rules = _rule_inputs(cfg.fallback, rule_stale_s)
        p = cfg.policy
        self.policy = LoopPolicy(
            threshold=p.threshold,
            hysteresis_ratio=p.hysteresis_ratio,
            on_ticks=p.on_ticks,
            off_ticks=p.off_ticks,
        )

        # figures (fixed size, allocated once)
        self.ticks = 0
        self.model_faults = 0
        self.fallback_ticks = 0
        self.safe_ticks = 0
        self.actuator_errors = 0
        self.anomalies = 0
        self.h_lateness = Histogram(resolution=0.001)  # ms
        self.h_age = Histogram(resolution=0.001)  # ms
        self.h_actuation = Histogram(resolution=0.001)  # ms
        self.h_latency = Histogram(resolution=0.001)  # ms
        self.h_infer = Histogram(resolution=0.1)  # us
        self.scores: deque[float | None] = deque(maxlen=max(1, cfg.history))
        self.last_score: float | None = None
        self.last_decision: Decision | None = None
        self.mode: Mode | None = None
        self.reason: str | None = None
        self.model_version: str | None = None

        # actuator bookkeeping
        self.written: float | None = None  # last value confirmed written
        self.written_at = -math.inf
        self.actuator_failed: str | None = None
        self.output: str | None = None

        self._runner: Any = None  # the runner whose ABI was last checked
        self._runner_takes_times = False  # its infer() accepts times= (sample timestamps)
        # timestamps handed to the runner: windowed inputs only (a scalar has no spectrum)
        self._times = {i.name: i.tbuf for i in self.inputs if i.window > 1}
        self._runner_abi_error: str | None = None
        self._schedule: Schedule | None = None
        self._fresh: list[str] = []  # phase-locked sensors: read at each tick
        self.fresh = FreshPolicy(period_s=self.period_s, spin_s=self.spin_s)
        # reads asked for ahead of the next tick (None: not asked ahead)
        self._ahead: list[asyncio.Future[bool]] | None = None
        self.fresh_late = 0  # ticks that decided without their fresh read
        self._summary_cache: tuple[float, dict[str, Any]] | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Drive the actuator to its safe state before the first tick."""
        if self.actuator is not None and self.safe_value is not None:
            await self._write(self.safe_value)

    async def warm(self, runs: int = WARM_RUNS) -> None:
        """Run the tick's code paths `runs` times before the first tick, then forget them.

        Why: the first calls of each path are slow (numpy's and onnxruntime's first
        calls on a new shape allocate and pick kernels, CPython specialises bytecode
        after a few executions, the first histogram and status call build their
        buffers). Done at start-up, before READY, they never land on a deadline. Inputs
        that are not usable yet (a window still filling) are skipped: the model's own
        warm-up (ModelRunner) covered its call with golden vectors. Nothing is
        actuated and no event is published; figures and counters are reset after.
        """
        scratch = LoopPolicy(
            threshold=self.policy.threshold,
            hysteresis_ratio=self.policy.hysteresis_ratio,
            on_ticks=self.policy.debouncer.on_ticks,
            off_ticks=self.policy.debouncer.off_ticks,
        )
        for _ in range(runs):
            _newest, fault = self._gather_inputs()
            score: float | None = None
            model_fault = fault
            if fault is None:
                score, model_fault = await self._infer()
            rules, rules_fault, _ = self._evaluate_rules()
            scratch.step(Observation(score, model_fault, rules, rules_fault))
            for h in (self.h_lateness, self.h_age, self.h_actuation, self.h_latency):
                h.record(0.0)
            self.h_infer.record(0.0)
            self._summary_cache = None
            self.status()
        for h in (self.h_lateness, self.h_age, self.h_actuation, self.h_latency, self.h_infer):
            h.reset()
        self._summary_cache = None
        self.ticks = self.model_faults = self.fallback_ticks = self.safe_ticks = 0
        self.scores.clear()
        self.last_score = None

    def release(self) -> None:
        """Let `run()` start ticking (see `hold`)."""
        self._go.set()

    async def run(self) -> None:
        if self.hold:  # the daemon releases the loops after gc.freeze(), just before READY
            await self._go.wait()
        self._schedule = Schedule(self.first_deadline(self.clock()), self.period_s)
        self._lock_fresh_inputs(self._schedule.t0)
        try:
            await run_schedule(
                self._schedule,
                self.tick,
                spin_s=self.spin_s,
                clock=self.clock,
                sleep=self.sleep,
                prepare=self if self._fresh else None,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("loop_crashed", loop=self.id, error=repr(exc))
            await self.drive_safe(f"loop crashed: {exc!r}")
            raise

    def _lock_fresh_inputs(self, t0: float) -> None:
        """Ask the hub to read each `fresh` input's sensor just before every tick: done
        once the deadline grid is known (the spin is the margin: the event loop stores no
        sample while the loop spins)."""
        sensors = {i.sensor for i in self.cfg.inputs if i.fresh}
        if not sensors:
            return
        hub = self.hub
        for sensor in sorted(sensors):
            if hub.lock_phase(sensor, self.period_s, t0):
                self._fresh.append(sensor)
            else:
                log.warning(
                    "loop_input_not_phase_locked",
                    loop=self.id,
                    sensor=sensor,
                    why="a stream sensor delivers at its own pace",
                )

    # --- fresh reads (edgerund/control/fresh.py) --------------------------------------

    def _request_fresh(self, ahead: bool) -> list[asyncio.Future[bool]]:
        """Ask the hub for a read of each fresh input's sensor. Ahead of the tick, each
        read's duration to its stored sample teaches the lead (fresh.py)."""
        hub = self.hub
        reads: list[asyncio.Future[bool]] = []
        for s in self._fresh:
            f = hub.request_read(s)
            if f is not None:
                reads.append(asyncio.ensure_future(f))  # the hub's future itself
        if ahead and reads:
            clock = self.clock
            t_req = clock()
            stored = self.fresh.stored

            def done(f: asyncio.Future[bool]) -> None:
                if not f.cancelled():
                    stored(clock() - t_req)

            reads[-1].add_done_callback(done)
        return reads

    @property
    def lead_s(self) -> float:
        """scheduler.Prepare: how long before each deadline the fresh reads are asked
        for (0: by the tick itself)."""
        return self.fresh.lead_s

    async def ahead(self, deadline: float) -> None:
        """scheduler.Prepare: ask for the fresh reads ahead of the tick (no waiting)."""
        self._ahead = self._request_fresh(ahead=True)

    async def _fresh_at_tick(self) -> None:
        """The tick's fresh reads: asked for now and waited for (at most `wait_s`), or
        asked for ahead of the tick (then checked: a read not stored yet is late)."""
        fresh = self.fresh
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if not all(f.done() for f in ahead):
                self.fresh_late += 1
        elif fresh.at_tick:
            t_req = self.clock()
            reads = self._request_fresh(ahead=False)
            if reads:
                _, pending = await asyncio.wait(reads, timeout=fresh.wait_s)
                if pending:
                    self.fresh_late += 1
                fresh.waited(self.clock() - t_req)
        else:  # ahead, but the deadline came before the request could (an overrun)
            self.fresh_late += 1
        fresh.ticked()

    def first_deadline(self, now: float) -> float:
        """t0 of the deadline grid: free-running, or aligned to the clock plus `phase_us`."""
        if self.cfg.phase_us is None:
            return now + self.period_s
        phase = (self.cfg.phase_us / 1e6) % self.period_s
        k = math.floor((now - phase) / self.period_s) + 1
        return k * self.period_s + phase

    @property
    def missed(self) -> int:
        return self._schedule.missed if self._schedule is not None else 0

    @property
    def overruns(self) -> int:
        return self._schedule.overruns if self._schedule is not None else 0

    def set_fallback(self, rules: Sequence[FallbackRuleConfig], stale_s: Sequence[float]) -> None:
        """Replace the fallback rules (a reload). Called on the event loop between ticks,
        so the next tick evaluates the new rules whole; the policy's state (mode,
        debounce counters) carries over."""
        self.rules = _rule_inputs(rules, stale_s)
        self.cfg = msgspec.structs.replace(self.cfg, fallback=list(rules))

    def forget_runner(self) -> None:
        """Re-read the runner's manifest (ABI, threshold) on the next tick."""
        self._runner = None

    async def drive_safe(self, why: str) -> bool:
        """Write the safe value (shutdown, fault). Returns True when it was written."""
        if self.actuator is None or self.safe_value is None:
            return False
        ok = await self._write(self.safe_value)
        self.output = "safe"
        if ok:
            log.info("actuator_safe", loop=self.id, value=self.safe_value, why=why)
        return ok

    # --- one tick -------------------------------------------------------------------

    async def tick(self, deadline: float, woke: float) -> None:
        self.ticks += 1
        self.h_lateness.record((woke - deadline) * 1000.0)
        if self._fresh:
            await self._fresh_at_tick()

        newest, input_fault = self._gather_inputs()
        score: float | None = None
        model_fault = input_fault
        if model_fault is None:
            score, model_fault = await self._infer()
        self.last_score = score
        self.scores.append(None if score is None else round(score, 6))

        rules = None
        rules_fault: str | None = None
        if model_fault is not None:
            if self.cfg.model is not None and input_fault is None:
                self.model_faults += 1
            rules, rules_fault, rule_newest = self._evaluate_rules()
            if rules is not None:
                newest = rule_newest
        decision = self.policy.step(Observation(score, model_fault, rules, rules_fault))
        t_decision = self.clock()
        if newest is not None:
            self.h_age.record((t_decision - newest) * 1000.0)
        self.last_decision = decision
        if decision.mode is Mode.FALLBACK:
            self.fallback_ticks += 1
        elif decision.mode is Mode.SAFE:
            self.safe_ticks += 1

        if decision.mode_changed:
            self._on_mode_change(decision)
        self.reason = decision.reason  # may change within a mode (failed -> stale)
        if decision.transition is not None:
            self._on_transition(decision, score, rules)

        await self._actuate(decision, t_decision, newest)

    def _gather_inputs(self) -> tuple[float | None, str | None]:
        """Fill the input buffers. Returns (time of the newest sample, fault or None)."""
        if not self.inputs:
            return None, "no model inputs configured" if self.cfg.model else "no model configured"
        now = self.clock()
        newest: float | None = None
        for inp in self.inputs:
            state = self.hub.state(inp.sensor)
            if state != "ok":
                return newest, f"input {inp.name}: sensor {inp.sensor} is {state}"
            for j, ch in enumerate(inp.channels):
                t, v = self.hub.window(inp.sensor, ch, inp.window)
                k = len(v)
                if k < inp.window:
                    return newest, (
                        f"input {inp.name}: {inp.sensor}.{ch} has {k} of {inp.window} samples"
                    )
                t_last = float(t[-1])
                if now - t_last > inp.stale_s:
                    return newest, (
                        f"input {inp.name}: {inp.sensor}.{ch} is stale: newest sample "
                        f"{(now - t_last) * 1000:.0f} ms old (limit {inp.stale_s * 1000:.0f} ms)"
                    )
                if newest is None or t_last > newest:
                    newest = t_last
                inp.buf[:, j] = v
                if j == 0:
                    inp.tbuf[:] = t
            if not np.isfinite(inp.buf).all():
                return newest, f"input {inp.name}: non-finite value in the window"
        return newest, None

    async def _infer(self) -> tuple[float | None, str | None]:
        name = self.cfg.model
        if name is None:
            return None, "no model configured"
        if self.models is None:
            return None, f"model {name}: no models component"
        runner = self.models.runner(name)
        if runner is None:
            return None, f"model {name}: not loaded"
        if runner is not self._runner:
            self._on_new_runner(runner)
        if self._runner_abi_error is not None:
            return None, self._runner_abi_error
        feeds: dict[str, np.ndarray] = {}
        for inp in self.inputs:
            feed = inp.feed
            if feed is None:  # not reshaped/cast: hand over a view in the declared dtype
                feed = inp.buf if inp.dtype == np.float64 else inp.buf.astype(inp.dtype)
            else:
                np.copyto(feed, inp.buf.reshape(feed.shape), casting="unsafe")
            feeds[inp.name] = feed
        try:
            if self._runner_takes_times:
                if getattr(runner, "inline", True):
                    res = runner.infer(feeds, times=self._times)
                else:  # measured over its latency budget: the runner's own thread
                    res = await runner.infer_async(feeds, times=self._times)
            elif getattr(runner, "inline", True):
                res = runner.infer(feeds)
            else:
                res = await runner.infer_async(feeds)
        except Exception as exc:  # the runner should report faults, but never crash a loop
            return None, f"model {name}: infer raised {exc!r}"
        infer_us = _field(res, "infer_us")
        if infer_us is not None:
            self.h_infer.record(float(infer_us))
        if not _field(res, "ok", False):
            return None, f"model {name}: fault: {_field(res, 'fault') or 'unknown'}"
        score = float(_field(res, "score", math.nan))
        if not math.isfinite(score):
            return None, f"model {name}: output is {score}"
        return score, None

    def _on_new_runner(self, runner: Any) -> None:
        manifest = runner.manifest
        self._runner = runner
        self._runner_takes_times = _accepts_times(runner)
        version = _field(manifest, "version")
        self.model_version = None if version is None else str(version)
        err = abi_mismatch(manifest, self.inputs)
        self._runner_abi_error = (
            None if err is None else f"model {self.cfg.model}: ABI mismatch: {err}"
        )
        if err is None:
            declared = {str(_field(d, "name")): d for d in _field(manifest, "inputs")}
            for inp in self.inputs:
                d = declared[inp.name]
                shape = tuple(int(x) for x in (_field(d, "shape") or ()))
                dtype = np.dtype(str(_field(d, "dtype", "float32")))
                inp.dtype = dtype
                inp.shape = shape
                same = shape == inp.buf.shape and dtype == np.float64
                # a preallocated feed in the model's dtype and shape, refilled every tick
                inp.feed = None if same else np.zeros(shape, dtype=dtype)
        if self.cfg.policy.threshold is None:
            thr = _field(manifest, "threshold")
            if isinstance(thr, Mapping):  # e.g. {"value": 0.12, "quantile": 0.999}
                thr = thr.get("value")
            self.policy.threshold = None if thr is None else float(thr)
        log.info(
            "loop_model",
            loop=self.id,
            model=self.cfg.model,
            version=self.model_version,
            threshold=self.policy.threshold,
            abi_error=self._runner_abi_error,
        )

    def _evaluate_rules(self) -> tuple[Any, str | None, float | None]:
        if not self.rules:
            return None, "no fallback rules configured", None
        now = self.clock()
        values: dict[str, F64] = {}
        newest: float | None = None
        for ri in self.rules:
            state = self.hub.state(ri.sensor)
            if state != "ok":
                return None, f"rule {ri.rule.name}: sensor {ri.sensor} is {state}", None
            t, v = self.hub.window(ri.sensor, ri.channel, ri.rule.samples)
            if len(v) < ri.rule.samples:
                return None, f"rule {ri.rule.name}: {len(v)} of {ri.rule.samples} samples", None
            age = now - float(t[-1])
            if age > ri.stale_s:
                return (
                    None,
                    (
                        f"rule {ri.rule.name}: stale: newest sample {age * 1000:.0f} ms old "
                        f"(limit {ri.stale_s * 1000:.0f} ms)"
                    ),
                    None,
                )
            if not np.isfinite(v).all():
                return None, f"rule {ri.rule.name}: non-finite value", None
            if newest is None or float(t[-1]) > newest:
                newest = float(t[-1])
            values[ri.rule.name] = v
        try:
            return evaluate_rules([ri.rule for ri in self.rules], values), None, newest
        except ValueError as exc:
            return None, str(exc), None

    # --- events -----------------------------------------------------------------------

    def _on_mode_change(self, d: Decision) -> None:
        previous = self.mode.value if self.mode is not None else None
        self.mode, self.reason = d.mode, d.reason
        level = log.info if d.mode is Mode.MODEL else log.warning
        level("loop_mode", loop=self.id, mode=d.mode.value, previous=previous, reason=d.reason)
        self.publish(
            "loop.fallback",
            self.id,
            mode=d.mode.value,
            previous=previous,
            reason=d.reason,
            model=self.cfg.model,
        )

    def _on_transition(self, d: Decision, score: float | None, rules: Any) -> None:
        kind = "anomaly.start" if d.transition == "start" else "anomaly.end"
        if d.transition == "start":
            self.anomalies += 1
        fields: dict[str, Any] = {
            "score": score,
            "threshold": self.policy.threshold,
            "mode": d.mode.value,
            "model": self.cfg.model,
            "version": self.model_version,
            "window": self._window_summary(),
        }
        if rules is not None:
            fields["rules"] = list(rules.tripped)
        log.warning(kind.replace(".", "_"), loop=self.id, score=score, mode=d.mode.value)
        self.publish(kind, self.id, **fields)

    def _window_summary(self) -> dict[str, Any]:
        """The input window for an anomaly event: stats and the newest samples per channel."""
        n = self.cfg.event_window_samples
        out: dict[str, Any] = {}
        for inp in self.inputs:
            b = inp.buf
            out[inp.name] = {
                "sensor": inp.sensor,
                "channels": list(inp.channels),
                "n": int(b.shape[0]),
                "mean": [round(float(x), 6) for x in b.mean(axis=0)],
                "rms": [round(float(x), 6) for x in np.sqrt((b * b).mean(axis=0))],
                "min": [round(float(x), 6) for x in b.min(axis=0)],
                "max": [round(float(x), 6) for x in b.max(axis=0)],
                "last": [[round(float(x), 6) for x in b[-n:, j]] for j in range(b.shape[1])]
                if n
                else [],
            }
        return out

    # --- actuation ----------------------------------------------------------------------

    def _value_for(self, output: str) -> float | None:
        if output == "active":
            return self.cfg.active_value
        if output == "normal":
            return self.cfg.normal_value
        return self.safe_value

    async def _actuate(self, d: Decision, t_decision: float, newest: float | None) -> None:
        self.output = d.output
        if self.actuator is None:
            return
        value = self._value_for(d.output)
        if value is None:
            return
        due = value != self.written or self.actuator_failed is not None
        if not due and self.refresh_s is not None:
            due = t_decision - self.written_at >= self.refresh_s
        if not due:
            return
        ok = await self._write(value)
        if not ok:
            if d.output != "safe" and self.safe_value is not None:
                await self._write(self.safe_value)
            return
        t_done = self.clock()
        self.h_actuation.record((t_done - t_decision) * 1000.0)
        if newest is not None:
            self.h_latency.record((t_done - newest) * 1000.0)

    async def _write(self, value: float) -> bool:
        assert self.actuator is not None
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await self.actuator.write(value)
        except Exception as exc:  # DeviceError, TimeoutError, or a driver bug: all faults
            self.actuator_errors += 1
            why = "timeout" if isinstance(exc, TimeoutError) else repr(exc)
            if self.actuator_failed is None:
                log.error("actuator_failed", loop=self.id, value=value, error=why)
            self.actuator_failed = why
            self.written = None
            return False
        if self.actuator_failed is not None:
            log.info("actuator_recovered", loop=self.id, value=value)
            self.actuator_failed = None
        self.written = value
        self.written_at = self.clock()
        return True

    # --- status -------------------------------------------------------------------------

    def _summaries(self) -> dict[str, Any]:
        """Histogram summaries, recomputed at most every STATUS_CACHE_S: twenty clients
        polling `status` must not cost the event loop a bucket scan each."""
        now = self.clock()
        if self._summary_cache is None or now - self._summary_cache[0] >= STATUS_CACHE_S:
            self._summary_cache = (
                now,
                {
                    "lateness_ms": self.h_lateness.summary(),
                    "latency_ms": self.h_latency.summary(),
                    "sample_age_ms": self.h_age.summary(),
                    "actuation_ms": self.h_actuation.summary(),
                    "inference_us": self.h_infer.summary(1),
                },
            )
        return self._summary_cache[1]

    def status(self) -> dict[str, Any]:
        d = self.last_decision
        writes = getattr(self.actuator, "writes", None) if self.actuator is not None else None
        return {
            "id": self.id,
            "period_ms": self.cfg.period_ms,
            "ticks": self.ticks,
            "missed": self.missed,
            **self._summaries(),
            "fresh": None
            if not self._fresh
            else {
                "sensors": list(self._fresh),
                "at_tick": self.fresh.at_tick,
                "lead_ms": round(self.fresh.lead_s * 1000, 3),
                "late": self.fresh_late,
                "went_ahead": self.fresh.switches,
            },
            "mode": self.mode.value if self.mode is not None else None,
            "reason": self.reason,
            "model": self.cfg.model,
            "model_version": self.model_version,
            "anomaly": d.active if d is not None else False,
            "anomalies": self.anomalies,
            "score": None if self.last_score is None else round(self.last_score, 6),
            "threshold": self.policy.threshold,
            "scores": list(self.scores),
            "model_faults": self.model_faults,
            "fallback_ticks": self.fallback_ticks,
            "safe_ticks": self.safe_ticks,
            "actuator": None
            if self.actuator is None
            else {
                "driver": self.actuator_driver,
                "output": self.output,
                "value": self.written,
                "state": "failed" if self.actuator_failed else "ok",
                "error": self.actuator_failed,
                "writes": writes,
                "errors": self.actuator_errors,
            },
        }
