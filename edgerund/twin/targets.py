"""Model targets of the desired state: the decisions (pure; docs/twin.md §5.1).

A desired document's `models` member names, per managed model, the version the operator
wants running and the exact bundle file (`sha256`, `size`), all inside the operator
signature. `parse_targets` checks each entry on its own (a bad entry refuses that model's
target, not the document). `decide` picks what to do with a valid target:

* `committed`: the version is already active: nothing to fetch;
* `remembered`: this bundle (sha256) was judged before and the judgement still holds:
  report it again, fetch nothing (no retry loop, across restarts too);
* `fetch`: pull it from the broker and hand it to the update pipeline.

What holds. A bundle VERDICT (refused by the pipeline: signature, counter, precheck and
golden vectors...; or rolled back by the probation) is final for that sha256: the same
bytes would be judged the same way. A TRANSFER failure (the bytes on the broker did not
match the signed hash, the meta disagreed, a cap was hit) says nothing about the bundle,
so a NEWER desired version (the backend republished and bumped the version) retries it;
the same version never does. A `committed` outcome is not final: if the model was rolled
back since, a newer desired version naming the same bundle installs it again.

`Memory` is the bounded record of outcomes by sha256 (the newest `MEMORY_MAX`), persisted
by the caller as JSON (`<state_dir>/twin/model-targets.json`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from edgerund.twin.bundlewire import is_sha256

MAX_TARGETS = 16
MEMORY_MAX = 64
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")

# Reported `state` values.
FETCHING = "fetching"
VERIFYING = "verifying"
TRIAL = "trial"
PROBATION = "probation"
COMMITTED = "committed"
ROLLED_BACK = "rolled_back"
REFUSED = "refused"
FAILED = "failed"

# Refusals that concern the transfer, not the bundle: a newer desired version retries.
TRANSFER_REASONS = frozenset(
    {
        "hash_mismatch",
        "bad_meta",
        "bad_chunk",
        "bad_range",
        "too_large",
        "chunk_too_large",
        "io_error",
    }
)


# The pipeline refused the target's job because the model runs a local override made
# under the same desired version (twin/pins.py): the backend has not decided yet, so a
# newer desired version naming the same bundle installs it.
OVERRIDDEN_LOCALLY = "overridden_locally"
# Refusals of the gateway's moment, not of the bundle (the pipeline's codes: updates/jobs.py
# `busy`, updates/steps.py `refusal`, updates/ratelimit.py): a newer desired version
# naming the same bundle tries again. Everything else the pipeline refused judged the
# bundle itself (signature, hashes, counter, version, golden vectors, precheck).
MOMENT_REASONS = frozenset(
    {OVERRIDDEN_LOCALLY, "busy", "counter_unavailable", "keyring_unusable", "rate_limited"}
)
RETRY_REASONS = TRANSFER_REASONS | MOMENT_REASONS


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    version: str
    sha256: str
    size: int
    url: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one bundle (by sha256) for one model."""

    name: str
    version: str
    sha256: str
    state: str
    reason: str | None
    message: str | None
    desired_version: int
    at: float

    @property
    def final(self) -> bool:
        """The bundle itself was judged: never fetched again."""
        if self.state == ROLLED_BACK:
            return True
        return self.state == REFUSED and self.reason not in RETRY_REASONS


def parse_targets(
    models: Mapping[str, Any], *, managed: Collection[str], max_bytes: int
) -> tuple[dict[str, Target], dict[str, tuple[str, str]]]:
    """(valid targets by model, refusals by model as (reason, message))."""
    targets: dict[str, Target] = {}
    refused: dict[str, tuple[str, str]] = {}
    for i, (name, spec) in enumerate(models.items()):
        name = str(name)[:128]
        if i >= MAX_TARGETS:
            refused[name] = ("malformed", f"models: expected at most {MAX_TARGETS} targets")
            continue
        if name not in managed:
            refused[name] = (
                "unknown_model",
                f"models.{name}: expected one of the managed models {sorted(managed)}",
            )
            continue
        if not isinstance(spec, dict):
            refused[name] = ("malformed", f"models.{name}: expected an object")
            continue
        version, sha, size, url = (
            spec.get("version"),
            spec.get("sha256"),
            spec.get("size"),
            spec.get("url"),
        )
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            refused[name] = ("malformed", f"models.{name}.version: expected a version string")
        elif not is_sha256(sha):
            refused[name] = ("malformed", f"models.{name}.sha256: expected 64 lowercase hex")
        elif not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            refused[name] = ("malformed", f"models.{name}.size: expected a positive integer")
        elif size > max_bytes:
            refused[name] = (
                "too_large",
                f"models.{name}.size: expected at most {max_bytes} bytes"
                f" (updates.bundle_max_mb), got {size}",
            )
        elif url is not None and not (
            isinstance(url, str) and len(url) <= 2048 and url.startswith(("http://", "https://"))
        ):
            refused[name] = ("malformed", f"models.{name}.url: expected an http(s) URL")
        else:
            assert isinstance(sha, str)
            targets[name] = Target(name, version, sha, size, url)
    return targets, refused


Decision = Literal["committed", "remembered", "fetch"]


def decide(
    target: Target, *, active_version: str | None, remembered: Outcome | None, desired_version: int
) -> Decision:
    if active_version == target.version:
        return "committed"
    if remembered is not None and (
        remembered.final or remembered.desired_version >= desired_version
    ):
        return "remembered"
    return "fetch"


class Memory:
    """Outcomes by sha256, newest last, at most MEMORY_MAX (pure; JSON in and out)."""

    def __init__(self, outcomes: Mapping[str, Outcome] | None = None) -> None:
        self.by_sha: dict[str, Outcome] = dict(outcomes or {})

    def get(self, sha256: str) -> Outcome | None:
        return self.by_sha.get(sha256)

    def put(self, outcome: Outcome) -> None:
        self.by_sha.pop(outcome.sha256, None)
        self.by_sha[outcome.sha256] = outcome
        while len(self.by_sha) > MEMORY_MAX:
            del self.by_sha[next(iter(self.by_sha))]

    def to_json(self) -> dict[str, Any]:
        return {"v": 1, "outcomes": [asdict(o) for o in self.by_sha.values()]}

    @classmethod
    def from_json(cls, data: object) -> Memory:
        """Entries that do not parse are dropped (the file is a cache of judgements, never
        a source of trust: at worst a bundle is fetched and judged again)."""
        mem = cls()
        items = data.get("outcomes") if isinstance(data, dict) else None
        for it in items if isinstance(items, list) else []:
            try:
                o = Outcome(
                    name=str(it["name"]),
                    version=str(it["version"]),
                    sha256=str(it["sha256"]),
                    state=str(it["state"]),
                    reason=None if it.get("reason") is None else str(it["reason"]),
                    message=None if it.get("message") is None else str(it["message"]),
                    desired_version=int(it["desired_version"]),
                    at=float(it["at"]),
                )
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            if is_sha256(o.sha256):
                mem.put(o)
        return mem
