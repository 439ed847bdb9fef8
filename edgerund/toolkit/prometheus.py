"""Render the daemon's `status` tree in the Prometheus text exposition format (0.0.4).

The mapping is generic so every capability's figures appear the day they are in
`status`: numeric leaves become gauges named after their path
(`edgerund_telemetry_backlog_batches`), records in a list become one series per record
labelled by its id (`edgerund_sensor_read_errors{sensor="cabinet"}`), `{p50, p99, max}`
figures become summaries with quantile labels, and keys known to only ever grow are
typed as counters with the `_total` suffix. Booleans are 0/1; strings that are states
become info-style gauges (`edgerund_sensor_state{sensor="x",state="ok"} 1`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

PREFIX = "edgerund"
# Monotonic counters among the status keys (by their last path element).
COUNTER_KEYS = frozenset(
    {
        "ticks",
        "missed",
        "read_errors",
        "frame_errors",
        "timeouts",
        "overruns",
        "reads",
        "samples",
        "sent_batches",
        "lost_samples",
        "requests",
        "errors",
        "refused",
        "restarts",
        "faults",
        "nan_outputs",
        "inferences",
        "reconnects",
        "evicted_batches",
        "pings",
        "withheld",
        "fallbacks",
        "crc_errors",
        "bytes_sent",
        "quotes",
        "signatures",
    }
)
STATE_KEYS = frozenset({"state", "mode", "kind", "active_slot"})
ID_KEYS = ("id", "name", "model", "port", "bus")
# Singular label names for well-known list sections.
LABELS = {"sensors": "sensor", "loops": "loop", "models": "model"}
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(parts: Iterable[str]) -> str:
    return _NAME_OK.sub("_", "_".join([PREFIX, *parts])).lower()


def _label_value(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    return None


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not v.is_integer() else str(int(v))


class _Families:
    def __init__(self) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[str]] = {}

    def add(
        self, name: str, kind: str, labels: dict[str, Any], value: float, suffix: str = ""
    ) -> None:
        if name not in self.types:
            self.types[name] = kind
            self.samples[name] = []
        elif self.types[name] != kind:
            return  # a conflicting shape under the same name: keep the first
        self.samples[name].append(f"{name}{suffix}{_labels(labels)} {_fmt(value)}")

    def render(self) -> str:
        out: list[str] = []
        for name, kind in self.types.items():
            out.append(f"# TYPE {name} {kind}")
            out.extend(dict.fromkeys(self.samples[name]))  # drop exact duplicates
        return "\n".join(out) + "\n"


def _walk(fam: _Families, node: Any, path: list[str], labels: dict[str, Any]) -> None:
    if isinstance(node, dict):
        if {"p50", "p99", "max"} <= node.keys():
            name = _metric_name(path)
            for q, key in (("0.5", "p50"), ("0.99", "p99")):
                v = _num(node[key])
                if v is not None:
                    fam.add(name, "summary", {**labels, "quantile": q}, v)
            mx = _num(node["max"])
            if mx is not None:
                fam.add(name + "_max", "gauge", labels, mx)
            return
        for k, v in node.items():
            _walk(fam, v, [*path, str(k)], labels)
        return
    if isinstance(node, list):
        if node and all(isinstance(x, dict) for x in node):
            section = path[-1] if path else "item"
            label = LABELS.get(section, section.rstrip("s") or "item")
            base = [*path[:-1], label] if path else [label]
            for item in node:
                ident = next((item[k] for k in ID_KEYS if k in item), None)
                item_labels = {**labels, label: ident} if ident is not None else labels
                for k, v in item.items():
                    if k in ID_KEYS and v == ident:
                        continue
                    _walk(fam, v, [*base, str(k)], item_labels)
        return  # lists of scalars (sparkline histories) are not metrics
    last = path[-1] if path else ""
    if isinstance(node, str):
        if last in STATE_KEYS:
            fam.add(_metric_name(path), "gauge", {**labels, last: node}, 1.0)
        return
    v = _num(node)
    if v is None:
        return
    if last in COUNTER_KEYS:
        fam.add(_metric_name(path) + "_total", "counter", labels, v)
    else:
        fam.add(_metric_name(path), "gauge", labels, v)


def render(status: dict[str, Any]) -> str:
    """The whole status tree as exposition text, with an `edgerund_up 1` first."""
    fam = _Families()
    fam.add(_metric_name(["up"]), "gauge", {}, 1.0)
    version = status.get("version")
    if version is not None:
        fam.add(_metric_name(["build_info"]), "gauge", {"version": version}, 1.0)
    skip = {"version", "pid", "gateway"}
    for k, v in status.items():
        if k not in skip:
            _walk(fam, v, [k], {})
    return fam.render()
