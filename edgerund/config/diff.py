"""Which keys changed between two configs, and which of them apply live (pure).

A reload (SIGHUP, `edgerunctl reload`, an applied desired state) must apply every changed
key live or name it as needing a restart; nothing is ignored silently. `changes` lists
the changed leaf keys as dotted paths, with `sensors`, `loops` and `models` keyed by their
id/name (`loops.motor.period_ms`) and an added or removed item as its own key
(`loops.pump`). `LIVE` is the table of what the components' `reload()` really apply
(hub: acquisition settings; loops: policy, active/normal values and fallback rules;
logging; metrics, which the root re-reads every interval); `split` puts every change on
one side.
"""

from __future__ import annotations

from typing import Any

import msgspec

KEYED = {"sensors": "id", "loops": "id", "models": "name"}

# Segment patterns (`*` = one segment; a pattern covers everything under it).
LIVE: tuple[str, ...] = (
    "logging.level",
    "logging.ring_size",
    "metrics",
    "sensors.*.rate_hz",
    "sensors.*.read_timeout_ms",
    "sensors.*.retries",
    "sensors.*.fail_after",
    "sensors.*.reprobe_s",
    "loops.*.policy",
    "loops.*.active_value",
    "loops.*.normal_value",
    "loops.*.fallback",
)


def _view(cfg: Any) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    for section, key in KEYED.items():
        items = data.get(section)
        if isinstance(items, list):
            data[section] = {str(it.get(key)): it for it in items if isinstance(it, dict)}
    return data


def _diff(a: Any, b: Any, path: tuple[str, ...], out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict) and len(path) < 3:
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(".".join((*path, str(k))))
            elif a[k] != b[k]:
                _diff(a[k], b[k], (*path, str(k)), out)
        return
    if a != b:
        out.append(".".join(path))


def changes(old: Any, new: Any) -> list[str]:
    """Changed keys, dotted, down to the first level inside a section or list item
    (`loops.motor.policy`, `telemetry.series`, `uplink.host`)."""
    out: list[str] = []
    _diff(_view(old), _view(new), (), out)
    return out


def _covered(pattern: str, key: str) -> bool:
    p, k = pattern.split("."), key.split(".")
    return len(p) <= len(k) and all(a in ("*", b) for a, b in zip(p, k, strict=False))


def split(keys: list[str], live: tuple[str, ...] = LIVE) -> tuple[list[str], list[str]]:
    """(applied live, needing a restart)."""
    applied = [k for k in keys if any(_covered(p, k) for p in live)]
    return applied, [k for k in keys if k not in applied]


def is_live(key: str, live: tuple[str, ...] = LIVE) -> bool:
    return any(_covered(p, key) for p in live)


__all__ = ["LIVE", "changes", "is_live", "split"]
