"""The sensor health state machine: pure, events in, actions out (no I/O, no clock).

States (what `edgerunctl sensors` shows):

    starting --ReadOk--> ok --ReadFailed x fail_after--> failed --ReadOk--> ok
        |                                                   ^
        +--OpenFailed / ReadFailed x fail_after-------------+
    any --Disable--> disabled

- `ReadFailed` is one *whole* failed acquisition (after the per-read immediate retries).
  Below `fail_after` consecutive failures nothing is logged: a single NACK or a missed GPS
  sentence is normal life on a bus. At `fail_after` the sensor becomes `failed`, the
  transition is logged ONCE with its reason, a `sensor.state` event is published and the
  acquisition task is told to close the device and re-probe it every `reprobe_s`.
- While `failed`, further failures (each re-probe that does not work) change nothing that
  is visible except `last_error`: no log line per retry.
- The first good read after `failed` is the recovery: logged once, event published.
- `OpenFailed` in `starting` goes straight to `failed`: opening already includes the
  immediate retries and a device that is absent at start-up is a fact worth one log line.

The transition table lives in `step()` alone, in the style of h11's `_state.py`; the I/O
layer (`edgerund/hub/acquire.py`) feeds it events and executes the returned actions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

State = Literal["starting", "ok", "failed", "disabled"]
STATES: tuple[State, ...] = ("starting", "ok", "failed", "disabled")


# ---- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadOk:
    pass


@dataclass(frozen=True, slots=True)
class ReadFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class OpenFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class Disable:
    reason: str = "disabled in config"


HealthEvent = ReadOk | ReadFailed | OpenFailed | Disable


# ---- actions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogTransition:
    """Log one line: `event` is the structlog event name, `level` the log level."""

    level: Literal["info", "warning"]
    event: str
    from_state: State
    to_state: State
    reason: str


@dataclass(frozen=True, slots=True)
class PublishState:
    """Publish `sensor.state` on the event bus (telemetry `evt`, the log ring)."""

    state: State
    reason: str


@dataclass(frozen=True, slots=True)
class Reprobe:
    """Close the device and re-open it after `reprobe_s` (the sensor is now failed)."""


HealthAction = LogTransition | PublishState | Reprobe


@dataclass(frozen=True, slots=True)
class Health:
    state: State = "starting"
    consecutive_failures: int = 0
    last_error: str | None = None
    transitions: int = 0  # how many visible state changes so far (for tests/status)


def _transition(h: Health, to: State, reason: str) -> tuple[Health, list[HealthAction]]:
    frm = h.state
    if to == "failed":
        level: Literal["info", "warning"] = "warning"
        event = "sensor_failed"
    elif to == "ok":
        level = "info"
        event = "sensor_recovered" if frm == "failed" else "sensor_ok"
    else:
        level = "info"
        event = f"sensor_{to}"
    new = replace(h, state=to, transitions=h.transitions + 1)
    actions: list[HealthAction] = [
        LogTransition(level, event, frm, to, reason),
        PublishState(to, reason),
    ]
    if to == "failed":
        actions.append(Reprobe())
    return new, actions


def step(h: Health, ev: HealthEvent, fail_after: int) -> tuple[Health, list[HealthAction]]:
    """Apply one event. Returns the new health and the actions to carry out, in order."""
    fail_after = max(1, fail_after)
    if h.state == "disabled":
        return h, []
    if isinstance(ev, Disable):
        return _transition(replace(h, consecutive_failures=0), "disabled", ev.reason)

    if isinstance(ev, ReadOk):
        if h.state == "ok":
            if h.consecutive_failures == 0:
                return h, []  # the hot path: no allocation
            return replace(h, consecutive_failures=0), []
        reason = "first good read" if h.state == "starting" else "read ok after re-probe"
        return _transition(replace(h, consecutive_failures=0), "ok", reason)

    if isinstance(ev, OpenFailed):
        h = replace(h, consecutive_failures=h.consecutive_failures + 1, last_error=ev.reason)
        if h.state == "failed":
            return h, [Reprobe()]
        return _transition(h, "failed", ev.reason)

    # ReadFailed
    h = replace(h, consecutive_failures=h.consecutive_failures + 1, last_error=ev.reason)
    if h.state == "failed":
        return h, [Reprobe()]
    if h.consecutive_failures >= fail_after:
        return _transition(
            h, "failed", f"{h.consecutive_failures} consecutive failures, last: {ev.reason}"
        )
    return h, []
