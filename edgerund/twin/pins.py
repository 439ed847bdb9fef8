"""Model pins: the twin's model targets as a local update sees them (pure; docs/twin.md §5.2).

A model target of the current desired version (twin/targets.py) says which version of a
model the backend wants running. Without a pin, a technician's `edgerunctl update`, a
bundle dropped in the inbox or a `cmd/update` transfer could install another version and
the gateway would run something the backend did not ask for, while the reported state
still said the target was `committed`. So the updates pipeline asks `check_local_update`
about every bundle job that is not the twin's own (jobs.py, once the manifest names the
model and version, before a byte is verified or staged):

* a model no target names, or the target's own version: allowed;
* another version: refused with `pinned_by_twin` (the message names the model, the pinned
  version and the desired version, and how to override), unless
* the job carries an explicit override (`edgerunctl update --override-twin`, a mutating
  command: root or the edgerund group): allowed, and recorded as an `Override`.

An override is never silent: while the model runs the override's version (and that is not
the target's), `active_override` returns it, the reported state marks the model
`twin_override: true` and its target `overridden` (twin/modeltargets.py, reported.py).
It is not undone behind the technician's back, not even by the same desired version's
target fetched meanwhile (`check_target_job`, at that job's turn in the pipeline): it
stands until the backend decides, i.e. until a newer desired version (one that still
names the model re-applies its target; one that does not leaves the model alone) or
until the model runs another version again.

The pins are set from the valid targets of each desired version offered (`set`, by
twin/modeltargets.py) and, at start-up, from the newest desired document re-verified from
its signature (the root: the applied one, or a newer one whose config fragment was refused
or reverted, twin/applier.py `load_offered`), so a restart without the broker does not
lift them. The overrides are persisted by the twin with its target memory
(`model-targets.json`): they are reporting state, never a source of trust.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from edgerund.errors import TrustError
from edgerund.ports import PINNED_BY_TWIN
from edgerund.twin.targets import OVERRIDDEN_LOCALLY, parse_targets

log = structlog.get_logger("edgerund.twin.pins")

__all__ = ["OVERRIDDEN", "OVERRIDDEN_LOCALLY", "PINNED_BY_TWIN", "Override", "Pin", "Pins"]

OVERRIDDEN = "overridden"  # the reported `desired.models[M].state` while an override runs


@dataclass(frozen=True, slots=True)
class Pin:
    model: str
    version: str
    desired_version: int


@dataclass(frozen=True, slots=True)
class Override:
    """A local update installed over a pin, as the job announced it."""

    model: str
    version: str | None  # the bundle's (manifest) version
    pinned: str  # the target's version at the time
    desired_version: int
    source: str  # "socket:UID"
    at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: object) -> Override | None:
        if not isinstance(d, dict):
            return None
        try:
            v = d.get("version")
            return cls(
                model=str(d["model"]),
                version=None if v is None else str(v),
                pinned=str(d["pinned"]),
                desired_version=int(d["desired_version"]),
                source=str(d["source"]),
                at=float(d["at"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


class Pins:
    """The pins of the newest desired version and the overrides made over them."""

    def __init__(self) -> None:
        self.version = 0  # the desired version the pins come from
        self.pins: dict[str, Pin] = {}
        self.overrides: dict[str, Override] = {}
        # Called after an override is recorded (the twin persists it and republishes).
        self.changed: Callable[[], None] = lambda: None

    def set(self, desired_version: int, targets: Mapping[str, str]) -> None:
        """The valid targets (model -> version) of desired version `desired_version`; an
        older version than the pins' is ignored (a late re-delivery)."""
        if desired_version < self.version:
            return
        self.version = desired_version
        self.pins = {m: Pin(m, v, desired_version) for m, v in targets.items()}

    def seed(
        self,
        desired_version: int,
        models: Mapping[str, Any],
        *,
        managed: Collection[str],
        max_bytes: int,
    ) -> None:
        """The pins of a desired document's `models` (its valid targets), at start-up."""
        targets, _ = parse_targets(models, managed=managed, max_bytes=max_bytes)
        self.set(desired_version, {n: t.version for n, t in targets.items()})

    def restore(self, overrides: Iterable[Override]) -> None:
        for o in overrides:
            self.overrides.setdefault(o.model, o)

    def check_local_update(
        self, model: str, version: str | None, *, source: str, override: bool
    ) -> None:
        """Raise TrustError `pinned_by_twin` when a target pins `model` to another version
        and `override` is not given; record the override when it is."""
        pin = self.pins.get(model)
        if pin is None or version == pin.version:
            return
        if not override:
            raise TrustError(
                PINNED_BY_TWIN,
                f"model {model} is pinned to {pin.version} by desired version"
                f" {pin.desired_version} of the twin; this bundle is {version}. Ask the"
                " operator to change the target, or install it anyway with `edgerunctl"
                " update --override-twin PATH` (reported upstream as an override)",
            )
        o = Override(model, version, pin.version, pin.desired_version, source, time.time())
        self.overrides[model] = o
        log.warning("twin_pin_overridden", **o.to_json())
        self.changed()

    def check_target_job(self, model: str, active_version: object) -> None:
        """Raise TrustError `overridden_locally` when `model` runs an override made under
        the current pins: a target job of that same desired version (fetched while the
        technician overrode it) must not undo the override. A newer desired version sets
        new pins, and its target installs again."""
        o = self.active_override(model, active_version)
        if o is not None and o.desired_version == self.version:
            raise TrustError(
                OVERRIDDEN_LOCALLY,
                f"model {model} runs {o.version}, installed over target {o.pinned} of"
                f" desired version {o.desired_version} ({o.source}, --override-twin); the"
                " override stands until a newer desired version",
            )

    def active_override(self, model: str, active_version: object) -> Override | None:
        """The override `model` runs now: its version is active and is not the target's."""
        o = self.overrides.get(model)
        pin = self.pins.get(model)
        if o is None or pin is None or active_version != o.version:
            return None
        return None if active_version == pin.version else o
