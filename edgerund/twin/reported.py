"""The reported state document (pure: the daemon's status in, a compact document out).

`twin/v1/{site}/{gateway}/reported` (retained) carries `{"signed": {...}, "key_id",
"sig"}`: `signed` is built here from the root's status (`build`), `sig` is the identity
key's ECDSA over SHA-256(`edgerund-reported-v1\\0` + canonical(signed)), the same key that
signs telemetry batches. docs/twin.md §4 lists the fields.

"Changes that matter": `material` drops the fields that move all the time (uptime, loop
tick counters, spool backlog, sequence) so the component republishes on a real change
(a sensor failing, a model swapped, a desired version applied) and otherwise only at the
heartbeat (a bundle fetch's progress counts in tenths of its size). The document stays
a few KB: per-sensor detail only for sensors that are not
ok, loops as counters, no sample values.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

REPORTED_TYPE = "edgerund-reported"
FORMAT_VERSION = 1
VOLATILE = ("uptime_s", "seq", "ts", "loops", "spool")


def _d(v: object) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _l(v: object) -> list[Mapping[str, Any]]:
    return [x for x in v if isinstance(x, Mapping)] if isinstance(v, list) else []


def build(
    status: Mapping[str, Any],
    *,
    seq: int,
    ts_ms: int,
    config_digest: str,
    origin: Mapping[str, str],
    desired: Mapping[str, Any],
    restart_needed: list[str],
    commands: Mapping[str, Any],
    overrides: Collection[str] = (),
) -> dict[str, Any]:
    """`overrides`: the models that run a version installed over their twin target
    (twin/pins.py), marked `twin_override: true` in `models[]`."""
    gw = _d(status.get("gateway"))
    ident = _d(status.get("identity"))
    sensors = _l(status.get("sensors"))
    tel = _d(status.get("telemetry"))
    upd = _d(status.get("updates"))
    keyring = _d(upd.get("keyring"))
    errors: dict[str, str] = {}
    for s in sensors:
        if s.get("state") not in ("ok", None) and s.get("last_error"):
            errors[f"sensor:{s.get('id')}"] = str(s.get("last_error"))[:200]
    for key, val in status.items():
        if key.endswith("_error") and isinstance(val, str):
            errors[key[: -len("_error")]] = val[:200]
    models = []
    for m in _l(status.get("models")):
        entry = {k: m.get(k) for k in ("name", "active_slot", "version", "state")}
        for extra in ("calibration", "drift"):
            if m.get(extra) is not None:
                entry[extra] = m.get(extra)
        lf = _d(m.get("last_failure"))
        if lf:
            entry["last_failure"] = lf.get("reason")
        if m.get("name") in overrides:
            entry["twin_override"] = True
        models.append(entry)
    return {
        "type": REPORTED_TYPE,
        "v": FORMAT_VERSION,
        "gateway": gw.get("id"),
        "site": gw.get("site"),
        "hardware_id": gw.get("hardware_id"),
        "labels": dict(_d(gw.get("labels"))),
        "seq": seq,
        "ts": ts_ms,
        "daemon_version": status.get("version"),
        "uptime_s": status.get("uptime_s"),
        "config": {"digest": config_digest, "origin": dict(origin)},
        "restart_needed": list(restart_needed),
        "desired": dict(desired),
        "models": models,
        "keyring": {"version": keyring.get("version"), "usable": keyring.get("usable")}
        if keyring
        else None,
        "identity": {
            "kind": ident.get("kind"),
            "key_id": ident.get("key_id"),
            "ak_name": ident.get("ak_name"),
        },
        "sensors": {
            "total": len(sensors),
            "ok": sum(1 for s in sensors if s.get("state") == "ok"),
            "not_ok": {str(s.get("id")): s.get("state") for s in sensors if s.get("state") != "ok"},
        },
        "loops": [
            {"id": lp.get("id"), "ticks": lp.get("ticks"), "missed": lp.get("missed")}
            for lp in _l(status.get("loops"))
        ],
        "spool": {
            "connected": tel.get("connected"),
            "backlog_batches": tel.get("backlog_batches"),
        },
        "errors": errors,
        "commands": dict(commands),
    }


def material(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a reported document whose change is worth a publish."""
    out = {k: v for k, v in doc.items() if k not in VOLATILE}
    out["spool_connected"] = _d(doc.get("spool")).get("connected")
    out["commands"] = {k: v for k, v in _d(doc.get("commands")).items() if k != "admitted"}
    desired = dict(_d(doc.get("desired")))
    if desired.get("models"):
        # A fetch's byte count moves all the time: only every tenth of the size is news.
        desired["models"] = {
            name: {**m, "bytes": _decile(m.get("bytes"), m.get("size"))}
            for name, m in _d(desired.get("models")).items()
            if isinstance(m, Mapping)
        }
        out["desired"] = desired
    return out


def _decile(done: object, size: object) -> int | None:
    if not isinstance(done, int) or not isinstance(size, int) or size <= 0:
        return None
    return min(10, done * 10 // size)
