"""Schema of the `loops` section (owned by the control component).

A loop maps the raw inputs its model declares (the manifest's `inputs` ABI, by name) to hub
channels, names the model, sets the policy (threshold + hysteresis + debounce), the
rule-based fallback, the actuator (a `driver:`-tagged union built from drivers.registry,
exactly like `sensors`) and its safe state. docs/control.md has an annotated example.

`cross_check(cfg)` finds what one section cannot see alone: unknown sensors and models,
duplicate loop ids, windows longer than the sensor's ring, and two loops driving the same
actuator. Checks that need the model's manifest or the live channel list (input shapes,
channel names) run at start-up in the component and raise ConfigError naming both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal, Protocol

import msgspec

from drivers.base import ActuatorConfig, SensorConfig
from drivers.registry import actuator_config_union
from edgerund.config.base import Section

if TYPE_CHECKING:
    ActuatorEntry = ActuatorConfig
else:
    ActuatorEntry = actuator_config_union()

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class InputConfig(Section):
    """One raw model input, assembled from hub channels.

    The array handed to the model has shape (window, len(channels)) (or (window,) for one
    channel), reshaped to the manifest's declared shape when the element counts agree.
    """

    name: str  # the manifest's raw input name, e.g. "vibration"
    sensor: str  # hub sensor id
    channels: Annotated[list[str], msgspec.Meta(min_length=1)]  # stacked as columns, in order
    window: Annotated[int, msgspec.Meta(ge=1, le=65536)]  # samples, newest last
    # True: the hub reads this (polled) sensor phase-locked to the loop, one read for each
    # tick, made when the tick asks for it (or just ahead of it on a loaded daemon), so the
    # loop decides on a sample a fraction of a millisecond old instead of up to a sensor
    # period (docs/control.md, "Fresh samples")
    fresh: bool = False


class PolicyConfig(Section):
    threshold: float | None = None  # None: the manifest's threshold (follows model swaps)
    # release level = threshold - |threshold| * hysteresis_ratio
    hysteresis_ratio: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.2
    on_ticks: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 3  # consecutive ticks above
    off_ticks: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 20  # consecutive ticks below


class FallbackRuleConfig(Section):
    """A plain limit on one raw hub channel, used when the model cannot decide."""

    sensor: str
    channel: str
    stat: Literal["last", "mean", "min", "max", "rms", "peak", "std"] = "last"
    samples: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 1  # window of the stat
    above: float | None = None  # trips when stat > above
    below: float | None = None  # trips when stat < below


class LoopConfig(Section):
    id: str
    period_ms: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    model: str | None = None  # a `models[].name`; None: fallback rules only
    inputs: list[InputConfig] = msgspec.field(default_factory=list)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    fallback: list[FallbackRuleConfig] = msgspec.field(default_factory=list)
    actuator: ActuatorEntry | None = None  # None: detect and report only
    active_value: float = 1.0  # written while an anomaly is active
    normal_value: float = 0.0  # written otherwise
    safe_state: float | None = None  # on start/shutdown/fault; None: actuator.safe_value
    # an input whose newest sample is older than this is stale (model -> fallback -> safe);
    # None: 3 sample periods of the sensor (from its rate_hz) + one loop period
    stale_after_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # busy-wait this long before each deadline to cancel event-loop timer rounding
    # (capped at period/4); 0 disables the spin
    spin_us: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 1000
    # None: deadlines start one period after start-up. Set: deadlines at whole multiples of
    # the period on the monotonic clock plus this phase, so a loop keeps a fixed phase to a
    # sensor polled on the same drift-free grid (read the sample just before deciding)
    phase_us: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # re-send the current command at least this often (0: every tick); None: on change only
    refresh_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    event_window_samples: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 32  # per channel
    history: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 60  # recent scores in status

    def resolved_safe_value(self) -> float | None:
        if self.safe_state is not None:
            return self.safe_state
        return self.actuator.safe_value if self.actuator is not None else None


def actuator_driver_name(cfg: ActuatorConfig) -> str:
    """The `driver:` tag of an actuator config struct."""
    tag = type(cfg).__struct_config__.tag
    return str(tag) if tag is not None else type(cfg).__name__


def actuator_target(cfg: ActuatorConfig) -> str:
    """What physical output an actuator config drives, to find two loops on one output.

    A driver's config may define `target() -> str`; otherwise every key except values and
    timeouts identifies it.
    """
    fn = getattr(cfg, "target", None)
    if callable(fn):
        return f"{actuator_driver_name(cfg)}:{fn()}"
    fields = msgspec.structs.asdict(cfg)
    ident = {
        k: v
        for k, v in sorted(fields.items())
        if not (k.endswith("_value") or k.endswith("_ms") or k.endswith("_s"))
    }
    return f"{actuator_driver_name(cfg)}:{ident}"


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _Loops(Protocol):
    """What `cross_check` reads of the root config (edgerund/config/schema.py)."""

    @property
    def loops(self) -> Sequence[LoopConfig]: ...
    @property
    def sensors(self) -> Sequence[SensorConfig]: ...
    @property
    def models(self) -> Sequence[_Named]: ...


def cross_check(cfg: _Loops) -> list[tuple[str, str]]:
    """Cross-section checks of `loops` against `sensors` and `models`."""
    errors: list[tuple[str, str]] = []
    sensors = {s.id: s for s in cfg.sensors}
    model_names = [m.name for m in cfg.models]
    seen_ids: dict[str, int] = {}
    targets: dict[str, str] = {}

    def sensor_ok(path: str, sensor_id: str, window: int) -> None:
        s = sensors.get(sensor_id)
        if s is None:
            known = ", ".join(sorted(sensors)) or "none configured"
            errors.append((path, f"unknown sensor {sensor_id!r} (expected one of: {known})"))
            return
        if not s.enabled:
            errors.append((path, f"sensor {sensor_id!r} is disabled (enabled: false)"))
        if window > s.window:
            errors.append(
                (
                    path,
                    f"window {window} is longer than sensor {sensor_id!r} keeps "
                    f"(expected <= its window: {s.window})",
                )
            )

    for i, loop in enumerate(cfg.loops):
        base = f"loops[{i}]"
        if loop.id in seen_ids:
            errors.append(
                (f"{base}.id", f"duplicate loop id {loop.id!r} (also loops[{seen_ids[loop.id]}])")
            )
        seen_ids.setdefault(loop.id, i)

        if loop.model is not None:
            if loop.model not in model_names:
                known = ", ".join(model_names) or "none configured"
                errors.append(
                    (f"{base}.model", f"unknown model {loop.model!r} (expected one of: {known})")
                )
            if not loop.inputs:
                errors.append((f"{base}.inputs", "a loop with a model needs inputs (got none)"))
        elif not loop.fallback:
            errors.append((f"{base}.model", "a loop needs a model or fallback rules (got neither)"))

        names: set[str] = set()
        for j, inp in enumerate(loop.inputs):
            p = f"{base}.inputs[{j}]"
            if inp.name in names:
                errors.append((f"{p}.name", f"duplicate input name {inp.name!r}"))
            names.add(inp.name)
            sensor_ok(f"{p}.sensor", inp.sensor, inp.window)
            if len(set(inp.channels)) != len(inp.channels):
                errors.append((f"{p}.channels", f"duplicate channel in {inp.channels}"))

        for j, rule in enumerate(loop.fallback):
            p = f"{base}.fallback[{j}]"
            sensor_ok(f"{p}.sensor", rule.sensor, rule.samples)
            if rule.above is None and rule.below is None:
                errors.append((p, "a fallback rule needs `above` or `below` (got neither)"))
            if rule.above is not None and rule.below is not None and rule.below >= rule.above:
                errors.append(
                    (
                        f"{p}.below",
                        f"expected below < above, got below={rule.below} above={rule.above}",
                    )
                )

        if loop.actuator is not None:
            t = actuator_target(loop.actuator)
            if t in targets:
                errors.append(
                    (f"{base}.actuator", f"output already driven by loop {targets[t]!r} ({t})")
                )
            else:
                targets[t] = loop.id
        if loop.refresh_ms is not None and loop.actuator is None:
            errors.append((f"{base}.refresh_ms", "refresh_ms needs an actuator (got none)"))
    return errors
