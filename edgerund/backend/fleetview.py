"""`edgerund fleet devices`: one line per gateway from its reported twin (pure).

A row is what an operator scans a fleet for: when the gateway was last heard of (the
reported document's own `ts`, so a retained document of a dead gateway shows its age),
what it runs (daemon and model versions, the state of a model target in flight), its
health (sensors ok of total, errors, uplink connected), the drift state of its models and
its telemetry backlog, and whether its config follows the desired document (`drift` is
the model's data drift; `desired` shows the desired version applied vs seen and the
outcome). `render` lays rows out as a fixed-width table; `--json` prints the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

COLUMNS = (
    "gateway",
    "site",
    "last_seen",
    "daemon",
    "models",
    "health",
    "drift",
    "backlog",
    "desired",
)


def _d(v: object) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = max(0.0, seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def device_row(reported: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    ts = reported.get("ts")
    age_s = (now_ms - ts) / 1000 if isinstance(ts, int | float) else None
    sensors = _d(reported.get("sensors"))
    spool = _d(reported.get("spool"))
    errors = _d(reported.get("errors"))
    models, drift = [], {}
    for m in reported.get("models") or []:
        if not isinstance(m, Mapping):
            continue
        models.append({"name": m.get("name"), "version": m.get("version"), "state": m.get("state")})
        dr = _d(m.get("drift"))
        if dr:
            drift[str(m.get("name"))] = dr.get("state")
    desired = _d(reported.get("desired"))
    targets = {
        str(k): {"version": _d(v).get("version"), "state": _d(v).get("state")}
        for k, v in _d(desired.get("models")).items()
    }
    total, ok = sensors.get("total"), sensors.get("ok")
    healthy = not errors and (total is None or ok == total) and spool.get("connected") is not False
    return {
        "gateway": reported.get("gateway"),
        "site": reported.get("site"),
        "last_seen_s": round(age_s, 1) if age_s is not None else None,
        "daemon_version": reported.get("daemon_version"),
        "models": models,
        "targets": targets,
        "health": {
            "ok": healthy,
            "sensors_ok": ok,
            "sensors_total": total,
            "not_ok": dict(_d(sensors.get("not_ok"))),
            "errors": len(errors),
            "connected": spool.get("connected"),
        },
        "drift": drift,
        "backlog_batches": spool.get("backlog_batches"),
        "desired": {
            "applied_version": desired.get("applied_version"),
            "version": desired.get("version"),
            "outcome": desired.get("outcome"),
            "reason": desired.get("reason"),
        },
    }


def _cells(row: Mapping[str, Any]) -> list[str]:
    h = _d(row.get("health"))
    health = "ok" if h.get("ok") else ""
    if not h.get("ok"):
        parts = []
        if h.get("sensors_total") is not None and h.get("sensors_ok") != h.get("sensors_total"):
            parts.append(f"sensors {h.get('sensors_ok')}/{h.get('sensors_total')}")
        if h.get("errors"):
            parts.append(f"{h.get('errors')} errors")
        if h.get("connected") is False:
            parts.append("uplink down")
        health = ", ".join(parts) or "?"
    models = []
    for m in row.get("models") or []:
        cell = f"{m.get('name')} {m.get('version')}"
        if m.get("state") not in ("COMMITTED", None):
            cell += f" {m.get('state')}"
        tgt = _d(_d(row.get("targets")).get(str(m.get("name"))))
        if tgt and tgt.get("version") != m.get("version"):
            cell += f" -> {tgt.get('version')} {tgt.get('state') or ''}".rstrip()
        models.append(cell)
    drift = ",".join(f"{k}:{v}" for k, v in _d(row.get("drift")).items()) or "-"
    d = _d(row.get("desired"))
    desired = "-"
    if d.get("version") is not None or d.get("applied_version") is not None:
        desired = f"v{d.get('applied_version')}"
        if d.get("outcome") and d.get("outcome") != "applied":
            desired += f" (v{d.get('version')} {d.get('outcome')} {d.get('reason') or ''})".rstrip()
    backlog = row.get("backlog_batches")
    return [
        str(row.get("gateway")),
        str(row.get("site")),
        _age(row.get("last_seen_s")),
        str(row.get("daemon_version")),
        "; ".join(models) or "-",
        health,
        drift,
        "-" if backlog is None else str(backlog),
        desired,
    ]


def render(rows: Sequence[Mapping[str, Any]]) -> str:
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    )
