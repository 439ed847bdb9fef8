"""Staged model rollouts: the decisions (pure: gateways' reported states and the time in,
actions out). The driver (`rollout_run.py`) does the MQTT and the PostgreSQL.

Theory of operation
-------------------
A rollout takes one signed model bundle (model NAME, version V, sha256, size) to a set of
gateways chosen by a **selector** over their reported twins (`site=plant-*,gateway=gw-1*`),
in **waves** whose sizes are cumulative (`1,10%,50%,100%`: one gateway, then up to 10 % of
the targets, then half, then all). For each gateway of a wave, the driver publishes a new
desired document that keeps the gateway's config patch and adds the model target; the
gateway fetches the bundle, verifies it, runs it on trial and probation and reports
`desired.models.NAME = {"version", "state", "reason"}`. A gateway is

    pending --wave starts--> sent --reports committed--> committed
                               |--reports rolled_back | refused | failed--> failed
                               |--reports overridden--> overridden
                               '--no outcome within timeout_s--> failed (timed_out)
    skipped: it already reported V at planning time (never sent)

and a committed gateway that reports a failure later (during the soak) becomes failed.
The rollout is

    running --every gateway of the wave has an outcome--> soaking (soak_s)
    soaking --soak over--> running (next wave) | succeeded (after the last wave)
    running|soaking --halt rule trips--> halted (reason names the rule and the figures)
    any state but a final one --abort--> aborted

The operator's inputs (selector, waves, halt rule) are parsed in rolloutspec.py. The
**halt rule** (`rolled_back>0 or failed_rate>2%`) is evaluated after every change,
also during a soak; once it trips no further desired document is sent, so the gateways of
later waves are never touched. Gateways already reached keep what they have (their own
probation rolls a bad model back); `fleet abort --revert` is the operator's way back.

**Overridden** (docs/twin.md §5.2): a technician installed another version over our
target with `edgerunctl update --override-twin`; the gateway reports the target
`overridden` (`twin_override`). That is a person's decision on the spot, not a fault of
the bundle: it ends the gateway's wait at once (its wave does not wait for the timeout),
is counted as `overridden` and never as `failed` (so it cannot trip `failed_rate>2%`), and
the rollout never sends it anything again (each gateway belongs to one wave; `fleet
resume` re-sends `sent` targets only). Its report is still read: if it later reports our
version committed (our target was installed after all), it becomes `committed`; a failure
of our bundle makes it `failed`; a committed gateway overridden during the soak becomes
`overridden`. A gateway that already ran an override when the rollout reached it answers
our target of an OLDER version with `refused`/`version_rollback` while `models[]` marks
the model `twin_override`: that is the same case and counts as `overridden` too (a newer
version simply installs over the override: `committed`). Taking an overridden gateway to
the version anyway is the operator's explicit decision: a new rollout once this one has
ended (it selects the gateway again, as it does not run V).

Metrics the rule may name, counted over the gateways reached so far (`sent` and after):
`targeted`, `committed`, `pending` (reached, no outcome yet), `rolled_back`, `refused`,
`error` (the gateway reported `failed`), `timed_out`, `failed` (the sum of the four
failure kinds), `overridden` (not a failure), and each as `NAME_rate` (its count
divided by `targeted`, 0 when nothing was reached). `2%` is 0.02 and may only be compared
with a rate. Operators: `> >= < <= == !=`, `and`, `or`, `not`, parentheses.

Every transition marks the gateways whose record changed in `Rollout.dirty`; the driver
writes those rows (and the rollout row) before it acts on the returned actions, so a
restarted tool resumes from the database exactly where the decisions stood: gateways that
are `committed`/`failed`/`overridden` are never targeted again, `sent` ones get the very
same desired document again (the gateway ignores a byte-identical copy). The status is
free text in PostgreSQL (no CHECK constraint or enum): a new status needs no migration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edgerund.backend.rolloutspec import (
    COUNTS,
    RolloutError,
    WaveSize,
    as_map,
    parse_rule,
    wave_ends,
)

_d = as_map

# --------------------------------------------------------------------------- vocabulary

MODEL_OK = frozenset({"committed"})
MODEL_FAILED = frozenset({"rolled_back", "refused", "failed"})
MODEL_BUSY = frozenset({"fetching", "verifying", "trial", "probation"})
MODEL_OVERRIDDEN = "overridden"  # twin/pins.py OVERRIDDEN: a technician's --override-twin
TWIN_OVERRIDE = "twin_override"
# Target statuses with an outcome: the gateway's wait is over (its wave may move on), and
# the driver keeps reading its reports (a later failure or commit still counts).
DONE = frozenset({"committed", "failed", "overridden"})
# Reached: the rollout published a desired document to it.
REACHED = frozenset({"sent"}) | DONE

TargetStatus = Literal["pending", "sent", "committed", "failed", "overridden", "skipped"]
RolloutState = Literal["running", "soaking", "halted", "aborted", "succeeded"]
FINAL_STATES = frozenset({"halted", "aborted", "succeeded"})


def running_version(reported: Mapping[str, Any], model: str) -> str | None:
    models = reported.get("models")
    for m in models if isinstance(models, list) else []:
        if isinstance(m, Mapping) and m.get("name") == model:
            v = m.get("version")
            return str(v) if v is not None else None
    return None


def runs_override(reported: Mapping[str, Any], model: str) -> bool:
    """The gateway runs `model` at a version a technician installed over its twin target
    (`models[].twin_override`, docs/twin.md §5.2)."""
    models = reported.get("models")
    for m in models if isinstance(models, list) else []:
        if isinstance(m, Mapping) and m.get("name") == model:
            return m.get("twin_override") is True
    return False


# --------------------------------------------------------------------------- the machine


@dataclass(slots=True)
class Target:
    gateway: str
    site: str
    wave: int  # -1 for skipped gateways
    status: TargetStatus = "pending"
    outcome: str | None = None  # the gateway's last reported model state
    reason: str | None = None
    prev_version: str | None = None  # what it ran when the rollout was planned
    sent_at: float | None = None
    done_at: float | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """Publish the target's desired document to these gateways (already marked sent)."""

    wave: int
    gateways: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WaveDone:
    wave: int


@dataclass(frozen=True, slots=True)
class Halted:
    reason: str


@dataclass(frozen=True, slots=True)
class Finished:
    pass


Action = Send | WaveDone | Halted | Finished


@dataclass(slots=True)
class Rollout:
    id: str
    model: str
    version: str
    halt_if: str
    soak_s: float
    timeout_s: float
    waves: list[int]  # cumulative end index of each wave in `order`
    targets: dict[str, Target]
    order: list[str]  # the non-skipped gateways, in rollout order
    state: RolloutState = "running"
    wave: int = -1  # the wave started last
    soak_until: float | None = None
    reason: str | None = None
    dirty: set[str] = field(default_factory=set)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def wave_members(self, wave: int) -> list[str]:
        lo = self.waves[wave - 1] if wave > 0 else 0
        return self.order[lo : self.waves[wave]]

    def counts(self) -> dict[str, float]:
        c = dict.fromkeys(COUNTS, 0.0)
        for t in self.targets.values():
            if t.status in ("pending", "skipped"):
                continue
            c["targeted"] += 1
            if t.status == "sent":
                c["pending"] += 1
            elif t.status == "committed":
                c["committed"] += 1
            elif t.status == "overridden":
                c["overridden"] += 1
            elif t.status == "failed":
                c["failed"] += 1
                kind = {"rolled_back": "rolled_back", "refused": "refused", "failed": "error"}
                c[kind.get(t.outcome or "", "timed_out")] += 1
        n = c["targeted"]
        for k in COUNTS:
            c[f"{k}_rate"] = c[k] / n if n else 0.0
        return c


def spread_order(rollout_id: str, gateways: Iterable[str]) -> list[str]:
    """A deterministic order that does not follow names (so a wave spreads over sites and
    hardware instead of taking `gw-001..gw-010`), stable for a given rollout id."""
    return sorted(
        gateways, key=lambda g: (hashlib.sha256(f"{rollout_id}\0{g}".encode()).digest(), g)
    )


@dataclass(frozen=True, slots=True)
class Candidate:
    gateway: str
    site: str
    running: str | None  # the model version it reports now


def plan(
    rollout_id: str,
    model: str,
    version: str,
    candidates: Sequence[Candidate],
    waves: Sequence[WaveSize],
    *,
    halt_if: str,
    soak_s: float,
    timeout_s: float,
) -> Rollout:
    """A new rollout over `candidates` (already selected); RolloutError if nobody is left
    to update or the rule does not parse."""
    parse_rule(halt_if)
    if soak_s < 0 or timeout_s <= 0:
        raise RolloutError("soak must be >= 0 and the gateway timeout > 0")
    targets: dict[str, Target] = {}
    todo = []
    for c in sorted(candidates, key=lambda c: c.gateway):
        if c.running == version:
            targets[c.gateway] = Target(
                c.gateway, c.site, -1, "skipped", reason="already runs it", prev_version=c.running
            )
        else:
            todo.append(c.gateway)
            targets[c.gateway] = Target(c.gateway, c.site, 0, prev_version=c.running)
    if not todo:
        raise RolloutError(
            f"no gateway to update: {len(candidates)} selected, all already run {version}"
            if candidates
            else "the selector matched no gateway"
        )
    order = spread_order(rollout_id, todo)
    ends = wave_ends(waves, len(order))
    for w, _ in enumerate(ends):
        lo = ends[w - 1] if w else 0
        for g in order[lo : ends[w]]:
            targets[g].wave = w
    if ends[-1] < len(order):  # a last wave below 100 %: the rest stays pending for good
        for g in order[ends[-1] :]:
            targets[g].wave = len(ends)
    r = Rollout(rollout_id, model, version, halt_if, soak_s, timeout_s, ends, targets, order)
    r.dirty.update(targets)
    return r


def model_outcome(
    reported: Mapping[str, Any],
    model: str,
    version: str,
    desired_version: int | None,
    sha256: str | None = None,
) -> tuple[str, str | None] | None:
    """The gateway's state for (model, version) in a reported document, or None when the
    document says nothing about this target yet (it predates our desired document).

    The target's entry `desired.models.NAME` (docs/twin.md §5.1) counts when it names our
    bundle (`sha256`, else `version`) and answers our desired version or a later one
    (`desired_version`, else the document's `desired.version`). A refusal of the whole
    desired document we sent (a bad signature, a forbidden key, a daemon that takes no
    model targets: `unsupported`) is `refused` with its reason. A gateway that reports
    the version committed in `models[]` after our document is `committed`.

    `overridden` (reason `twin_override`): the entry says so (a technician overrode our
    target), or the entry is `refused`/`version_rollback` while the model runs a
    `twin_override` version (it already ran a newer override when our target came: the
    pipeline will not go back to our version, and the override is what holds it)."""
    d = _d(reported.get("desired"))
    seen = d.get("version")
    fresh = desired_version is None or (isinstance(seen, int) and seen >= desired_version)
    target = _d(_d(d.get("models")).get(model))
    answered = target.get("desired_version")
    t_fresh = (
        desired_version is None or answered >= desired_version
        if isinstance(answered, int)
        else fresh
    )
    ours = target.get("sha256") == sha256 if sha256 and target.get("sha256") else None
    if ours is None:
        ours = target.get("version") == version
    if ours and t_fresh:
        state = str(target.get("state", "")).lower()
        why = target.get("reason")
        reason = str(why) if why is not None else None
        if (
            state == "refused"
            and reason == "version_rollback"
            and runs_override(reported, model)
            and running_version(reported, model) != version
        ):
            runs = running_version(reported, model)
            return MODEL_OVERRIDDEN, f"{TWIN_OVERRIDE} (version_rollback: runs {runs})"
        if state in MODEL_OK | MODEL_FAILED | MODEL_BUSY or state == MODEL_OVERRIDDEN:
            return state, reason
    if fresh and seen == desired_version and d.get("outcome") in ("refused", "failed"):
        return "refused", str(d.get("reason") or d.get("outcome"))
    if fresh and running_version(reported, model) == version:
        for m in reported.get("models") or []:
            if isinstance(m, Mapping) and m.get("name") == model:
                if str(m.get("state", "")).lower() == "committed":
                    return "committed", None
    return None


def _mark(r: Rollout, t: Target) -> None:
    r.dirty.add(t.gateway)


def record(r: Rollout, gateway: str, outcome: tuple[str, str | None] | None, now: float) -> None:
    """Take a gateway's reported `outcome` (from `model_outcome`) without deciding
    anything yet: a driver records every gateway's latest report, then calls `tick`
    once, so that a timeout is never judged before the report that answers it (a tool
    resumed after a long stop finds gateways that committed meanwhile committed)."""
    t = r.targets.get(gateway)
    if t is None or outcome is None or t.status not in ("sent", "committed", "overridden"):
        return
    state, reason = outcome
    if (state, reason) != (t.outcome, t.reason) and not (t.status in DONE and state in MODEL_BUSY):
        t.outcome, t.reason = state, reason
        _mark(r, t)
    if state in MODEL_OK and t.status != "committed":
        t.status, t.done_at = "committed", now  # an override replaced by our version too
    elif state == MODEL_OVERRIDDEN and t.status != "overridden":
        t.status, t.done_at = "overridden", now  # a person's decision: not a failure
    elif state in MODEL_FAILED:
        t.status, t.done_at = "failed", now


def observe(
    r: Rollout, gateway: str, outcome: tuple[str, str | None] | None, now: float
) -> list[Action]:
    """One gateway's report, then the decisions it leads to."""
    record(r, gateway, outcome, now)
    return tick(r, now)


def _describe(c: Mapping[str, float]) -> str:
    keys = (
        "targeted", "committed", "overridden", "rolled_back", "refused", "error", "timed_out",
        "pending",
    )  # fmt: skip
    return ", ".join(f"{k}={int(c[k])}" for k in keys if c[k] or k in ("targeted", "committed"))


def tick(r: Rollout, now: float) -> list[Action]:
    """Time went by (and/or something changed): timeouts, the halt rule, wave progress."""
    if r.final:
        return []
    for t in r.targets.values():
        if t.status == "sent" and t.sent_at is not None and now - t.sent_at >= r.timeout_s:
            last = t.outcome or "none"
            t.status, t.outcome, t.done_at = "failed", None, now
            t.reason = f"timed_out: no outcome within {r.timeout_s:g} s (last state {last})"
            _mark(r, t)
    c = r.counts()
    if parse_rule(r.halt_if).eval(c):
        r.state, r.reason = "halted", f"halt rule {r.halt_if!r} tripped: {_describe(c)}"
        failed = [t for t in r.targets.values() if t.status == "failed"]
        if failed:
            first = min(failed, key=lambda t: (t.done_at or 0.0, t.gateway))
            r.reason += f"; first failure {first.gateway}: {first.outcome or 'timed_out'}"
            r.reason += f" ({first.reason})" if first.reason else ""
        return [Halted(r.reason)]
    actions: list[Action] = []
    while not r.final:
        if r.state == "running":
            if r.wave < 0:
                actions.extend(_start_next(r, now))
                continue
            if all(r.targets[g].status in DONE for g in r.wave_members(r.wave)):
                r.state, r.soak_until = "soaking", now + r.soak_s
                actions.append(WaveDone(r.wave))
                continue
        elif r.state == "soaking" and r.soak_until is not None and now >= r.soak_until:
            actions.extend(_start_next(r, now))
            continue
        break
    return actions


def _start_next(r: Rollout, now: float) -> list[Action]:
    nxt = r.wave + 1
    if nxt >= len(r.waves):
        r.state, r.soak_until = "succeeded", None
        c = r.counts()
        r.reason = f"all waves done: {_describe(c)}"
        return [Finished()]
    r.state, r.wave, r.soak_until = "running", nxt, None
    members = r.wave_members(nxt)
    for g in members:
        t = r.targets[g]
        t.status, t.sent_at = "sent", now
        _mark(r, t)
    return [Send(nxt, tuple(members))]


def abort(r: Rollout, reason: str) -> list[str]:
    """Stop where it stands; the gateways that were reached (the driver may revert them)."""
    if not r.final:
        r.state, r.reason, r.soak_until = "aborted", reason, None
    return [t.gateway for t in r.targets.values() if t.status in REACHED]


# --------------------------------------------------------------------------- desired doc


def desired_with_target(
    previous: Mapping[str, Any] | None, model: str, target: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, models) of the next desired document: the previous document's config
    patch kept as it was, its model targets kept, `model`'s target set (or removed when
    `target` is None)."""
    prev = _d(previous)
    config = dict(_d(prev.get("config")))
    models = {k: dict(_d(v)) for k, v in _d(prev.get("models")).items()}
    if target is None:
        models.pop(model, None)
    else:
        models[model] = dict(target)
    return config, models


def next_desired_version(*seen: int | None) -> int:
    """Above every version the gateway or the database may have seen (a gateway refuses
    a version not above the last one it saw: `replay`)."""
    return max([v for v in seen if isinstance(v, int)] + [0]) + 1
