"""How edgerunctl shows results: generic tables and key/value lines, and the few
commands with a layout of their own (status, models, log, serial-sniff).

Rendering is generic: a list of flat records becomes a table (nested {p50,p99,max}
figures are shown as "p50/p99/max"), a mapping becomes aligned `key: value` lines, so a
new socket command is readable from edgerunctl the day it exists.

Width: every human table fits the terminal (`$COLUMNS`, 80 when piped). Cells never wrap
(a wrapped table at 80 columns turns every column into a sliver): columns are shrunk
from the widest down and cut with an ellipsis, and the per-command renderers choose
the few columns a technician reads (`sensors`: one main value per sensor, `+N` for the
other channels; `--wide` shows every channel and counter without a width limit, and
`--json` everything). A `key: value` line whose value is too long (a key id) continues
on indented lines instead of being cut.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    if isinstance(v, dict):
        if {"p50", "p99", "max"} <= v.keys():
            return f"{fmt(v['p50'])}/{fmt(v['p99'])}/{fmt(v['max'])}"
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        if len(v) > 8 and all(isinstance(x, (int, float)) for x in v):
            return f"[{len(v)} values]"
        return ", ".join(fmt(x) for x in v)
    return str(v)


COLUMN_GAP = 2  # rich's padding between columns of a box-less table


def fit_widths(natural: Sequence[int], floors: Sequence[int], total: int) -> list[int]:
    """Column widths that fit `total` characters with gaps: the widest column gives way
    first, down to its floor (its header), then every column down to 3 characters."""
    widths = list(natural)
    budget = total - COLUMN_GAP * (len(widths) - 1)
    for floor in (list(floors), [min(3, n) for n in natural]):
        while sum(widths) > budget:
            shrinkable = [i for i, w in enumerate(widths) if w > floor[i]]
            if not shrinkable:
                break
            widths[max(shrinkable, key=lambda j: widths[j])] -= 1
    return widths


def table(
    rows: list[dict[str, Any]],
    title: str | None = None,
    columns: Sequence[str] | None = None,
    max_width: int | None = 80,
) -> Table:
    """A box-less table; with `max_width`, cells are cut (…) so a line never exceeds it."""
    cols: list[str] = list(columns) if columns else []
    if not cols:
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
    cells = [[fmt(r.get(c)).replace("\n", " ") for c in cols] for r in rows]
    natural = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    widths = natural
    if max_width is not None:
        widths = fit_widths(
            natural, [min(len(c), n) for c, n in zip(cols, natural, strict=True)], max_width
        )
    t = Table(
        title=title,
        title_justify="left",
        box=None,
        pad_edge=False,
        show_edge=False,
        header_style="bold",
    )
    for c, w in zip(cols, widths, strict=True):
        # never wrap a cell: a wrapped table at 80 columns is a stack of slivers
        t.add_column(c, overflow="ellipsis", no_wrap=True, width=w)
    for row in cells:
        t.add_row(*row)
    return t


def _kv(d: dict[str, Any], indent: int = 0, max_width: int = 80) -> list[str]:
    lines: list[str] = []
    width = max((len(str(k)) for k in d), default=0)
    for k, v in d.items():
        text = fmt(v)
        head = f"{' ' * indent}{str(k).ljust(width)}  "
        nested = (
            isinstance(v, dict) and not ({"p50", "p99", "max"} <= v.keys()) and len(v) > 3
        ) or (isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v))
        if not nested and "\n" not in text and len(head) + len(text) > max_width:
            # a long value (key id, message) continues on indented lines, never cut
            lines.append(head.rstrip())
            lines.extend(
                textwrap.wrap(
                    text,
                    max_width,
                    initial_indent=" " * (indent + 4),
                    subsequent_indent=" " * (indent + 4),
                    break_long_words=True,
                )
            )
            continue
        pad = " " * indent
        if isinstance(v, dict) and not ({"p50", "p99", "max"} <= v.keys()) and len(v) > 3:
            lines.append(f"{pad}{k}:")
            lines.extend(_kv(v, indent + 2, max_width))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"{pad}{k}: ({len(v)})")
            for item in v:
                entry = ", ".join(f"{a}={fmt(b)}" for a, b in item.items())
                lines.extend(
                    textwrap.wrap(
                        entry,
                        max_width,
                        initial_indent=f"{pad}  - ",
                        subsequent_indent=f"{pad}    ",
                        break_long_words=True,
                    )
                )
        else:
            lines.append(f"{pad}{str(k).ljust(width)}  {fmt(v)}")
    return lines


def render(console: Console, result: Any, title: str | None = None) -> None:
    if isinstance(result, list) and all(isinstance(r, dict) for r in result):
        if result:
            console.print(table(result, title, max_width=console.width))
        else:
            console.print(f"{title or 'result'}: none")
    elif isinstance(result, dict):
        console.print(
            "\n".join(_kv(result, max_width=console.width)), markup=False, highlight=False
        )
    else:
        console.print(fmt(result), markup=False, highlight=False)


_STATUS_COLUMNS = {
    "sensors": ["id", "driver", "state", "value", "unit", "age s", "rate Hz", "errors"],
    "loops": ["id", "period", "mode", "ticks", "missed", "late p99", "lat p99", "score"],
    "models": ["name", "version", "active_slot", "state"],
}


def _sensor_row(s: dict[str, Any]) -> dict[str, Any]:
    """One line per sensor: the first channel's value, '+N' for the others."""
    chans = s.get("channels") or []
    if chans and isinstance(chans[0], dict):
        more = f" (+{len(chans) - 1})" if len(chans) > 1 else ""
        value: Any = f"{fmt(chans[0].get('value'))}{more}"
        unit: Any = chans[0].get("unit")
    else:
        value, unit = s.get("value"), s.get("unit")
    return {
        "id": s.get("id"),
        "driver": s.get("driver"),
        "state": s.get("state"),
        "value": value,
        "unit": unit,
        "age s": s.get("age_s"),
        "rate Hz": s.get("rate_achieved_hz"),
        "errors": s.get("read_errors"),
    }


def _main_value(value: Any) -> str:
    """The first channel's value of a `sensors` entry ("25.9 °C, 1014 hPa" -> "25.9 °C +1")."""
    if not isinstance(value, str):
        return fmt(value)
    parts = [p.strip() for p in value.split(", ") if p.strip()]
    if len(parts) <= 1:
        return value
    return f"{parts[0]} +{len(parts) - 1}"


def sensors_rows(result: list[dict[str, Any]], wide: bool = False) -> list[dict[str, Any]]:
    """`edgerunctl sensors`: the columns that fit 80; `--wide`: every key, every channel."""
    if wide:
        return result
    rows = []
    for s in result:
        errors = sum(int(s.get(k) or 0) for k in ("read_errors", "frame_errors", "timeouts"))
        rows.append(
            {
                "id": s.get("id"),
                "driver": s.get("driver"),
                "state": s.get("state"),
                "value": _main_value(s.get("value")),
                "age s": s.get("age_s"),
                "Hz": s.get("rate_achieved_hz"),
                "errors": errors,
                "last error": s.get("last_error"),
            }
        )
    return rows


def model_row(m: dict[str, Any]) -> dict[str, Any]:
    """The columns a technician reads; --json has everything."""
    return {
        "name": m.get("name"),
        "version": m.get("version"),
        "slot": m.get("active_slot"),
        "state": m.get("state"),
        "prec": m.get("precision"),
        "runs": m.get("inferences"),
        "faults": m.get("faults"),
        "NaN": m.get("nan_outputs"),
        "us p50/p99": f"{fmt(m.get('infer_p50_us'))}/{fmt(m.get('infer_p99_us'))}",
        "drift": _drift_text(m.get("drift")),
        "last error": m.get("last_error") or _quarantine_text(m),
    }


def _drift_text(d: Any) -> str | None:
    """`drift 5 moved (accel_g.x.band3 +2.1 sd, ...)`, `sensor_fault accel_g.y`, `ok`."""
    if not isinstance(d, dict):
        return None
    state = str(d.get("state"))
    if state == "sensor_fault":
        return f"sensor_fault {d.get('channel')}"
    moved = d.get("moved") or []
    if state == "drift" and moved:
        top = ", ".join(f"{x['feature']} {x['shift_sd']:+.1f} sd" for x in moved[:2])
        return f"drift {d.get('n_moved')} moved ({top})"
    return state


def calibration_lines(models: list[dict[str, Any]]) -> list[str]:
    """Under the models table: the device calibration each model runs, if any: cal.N,
    on how many samples, what it changed (the largest shifts) and the threshold."""
    lines = []
    for m in models:
        c = m.get("calibration")
        if not isinstance(c, dict):
            continue
        seq = str(c.get("version", "")).rsplit("+", 1)[-1]
        lines.append(
            f"{m.get('name')}: calibration {seq} of {c.get('base_version')} on"
            f" {c.get('samples')} samples, threshold {fmt(c.get('threshold'))}"
            f" (signed {fmt(c.get('threshold_signed'))}), largest shift"
            f" {fmt(c.get('max_shift_sd'))} sd"
        )
        changes = [x for x in c.get("changes") or [] if x.get("shift_sd")]
        if changes:
            lines.append(
                "  changed "
                + ", ".join(f"{x['feature']} {float(x['shift_sd']):+.2f} sd" for x in changes[:4])
                + (f" (+{len(changes) - 4} more)" if len(changes) > 4 else "")
            )
    return lines


def provider_lines(models: list[dict[str, Any]], *, only_fallbacks: bool = False) -> list[str]:
    """Under the models table: the execution provider each model runs on and, for each
    provider it asked for and does not use, why (models[].providers)."""
    lines = []
    for m in models:
        fallbacks = m.get("provider_fallbacks") or []
        if m.get("provider") is None or (only_fallbacks and not fallbacks):
            continue
        lines.append(f"{m.get('name')}: runs on {m.get('provider')}")
        lines += [f"  not {f.get('provider')}: {f.get('reason')}" for f in fallbacks]
    return lines


def _loop_row(lp: dict[str, Any]) -> dict[str, Any]:
    def p99(d: Any) -> Any:
        return d.get("p99") if isinstance(d, dict) else None

    score, thr = lp.get("score"), lp.get("threshold")
    return {
        "id": lp.get("id"),
        "period": f"{lp.get('period_ms')} ms",
        "mode": lp.get("mode"),
        "ticks": lp.get("ticks"),
        "missed": lp.get("missed"),
        "late p99": p99(lp.get("lateness_ms")),
        "lat p99": p99(lp.get("latency_ms")),
        "score": f"{fmt(score)}/{fmt(thr)}" if thr is not None else fmt(score),
    }


def _say(console: Console, text: str) -> None:
    """One plain line, continued (indented) rather than overflowing the terminal."""
    width = max(40, console.width)
    console.print(
        textwrap.fill(text, width, subsequent_indent="  ", break_long_words=True),
        markup=False,
        highlight=False,
    )


def render_status(console: Console, st: dict[str, Any]) -> None:
    ident = st.get("identity") or {}
    tel = st.get("telemetry") or {}
    gw = st.get("gateway") or {}
    _say(
        console,
        f"edgerund {st.get('version')}  gateway {gw.get('id', '?')} (site {gw.get('site', '?')})"
        f"  up {st.get('uptime_s', 0):.0f} s  loop lag {st.get('loop_lag_ms', 0):.2f} ms"
        + ("  [SIMULATED]" if st.get("simulate") else ""),
    )
    key_id = str(ident.get("key_id") or "-")
    _say(
        console,
        # the full key id is in `edgerunctl identity`; 16 hex digits identify it here
        f"identity: {ident.get('kind')} key {key_id[:16]}{'…' if len(key_id) > 16 else ''}"
        + ("  (INSECURE software key)" if ident.get("insecure") else ""),
    )
    _say(
        console,
        f"telemetry: {'connected' if tel.get('connected') else 'offline'}, "
        f"backlog {tel.get('backlog_batches', 0)} batches, sent "
        f"{tel.get('sent_batches', 0)}, lost samples {tel.get('lost_samples', 0)}"
        + (", HELD: no subscriber on the broker" if tel.get("no_subscriber") else ""),
    )
    for key, cols in _STATUS_COLUMNS.items():
        rows = st.get(key) or []
        if key == "sensors":
            rows = [_sensor_row(r) for r in rows]
        elif key == "loops":
            rows = [_loop_row(r) for r in rows]
        console.print()
        if rows:
            console.print(
                table(
                    rows,
                    key,
                    [c for c in cols if any(c in r for r in rows)],
                    max_width=console.width,
                )
            )
        else:
            console.print(f"{key}: none configured", markup=False, highlight=False)
        if key == "models":  # only when a model is not on the provider it asked for first
            for line in provider_lines(rows, only_fallbacks=True):
                console.print(line, markup=False, highlight=False)


def render_log(console: Console, events: list[dict[str, Any]]) -> None:
    for e in events:
        extra = " ".join(
            f"{k}={fmt(v)}"
            for k, v in e.items()
            if k not in ("timestamp", "level", "event", "logger")
        )
        console.print(
            f"{e.get('timestamp', '')} {str(e.get('level', '')).upper():7} "
            f"{e.get('event', '')} {extra}",
            markup=False,
            highlight=False,
        )


def _clock(t_wall: Any) -> str:
    if not isinstance(t_wall, (int, float)):
        return "-"
    ms = int(t_wall * 1000) % 1000
    return time.strftime("%H:%M:%S", time.localtime(t_wall)) + f".{ms:03d}"


def render_sniff(console: Console, result: Any) -> None:
    frames = result.get("frames", result) if isinstance(result, dict) else result
    for f in frames or []:
        if isinstance(f, dict):
            console.print(
                f"{_clock(f.get('t_wall'))} {f.get('len', ''):>4}  {f.get('hex', '')}  "
                f"|{f.get('text', '')}|",
                markup=False,
                highlight=False,
            )


def _quarantine_text(m: dict[str, Any]) -> str | None:
    q = m.get("quarantined")
    if not isinstance(q, dict) or not q:
        return None
    return "; ".join(
        f"slot {slot} quarantined: {(v or {}).get('reason')}" for slot, v in sorted(q.items())
    )
