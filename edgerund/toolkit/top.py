"""`edgerunctl top`: a live view of the gateway for a technician's terminal (and SSH).

One `status` request per refresh (a few per second) and one `log` request every few
refreshes: the daemon answers both from memory, so `top` costs it a few hundred
microseconds per second and never touches a control loop. Value histories for the
sparklines are kept here, client-side, from successive polls.

Layout fits 80x24: a header, the sensors table, the loops table (with a sparkline of the
anomaly score against its threshold), models / identity / uplink lines and the last
warnings. In a dumb terminal (TERM=dumb, or output not a terminal) it falls back to a
plain table printed every interval. `q` or Ctrl-C quits.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgerund.ctl.client import DiagClient, Unreachable
from edgerund.errors import CommandError

BLOCKS = "▁▂▃▄▅▆▇█"
MIN_COLS, MIN_ROWS = 60, 16


def sparkline(
    values: list[float], width: int = 16, lo: float | None = None, hi: float | None = None
) -> str:
    vals = [v for v in values[-width:] if isinstance(v, (int, float))]
    if not vals:
        return ""
    lo = min(vals) if lo is None else lo
    hi = max(vals) if hi is None else hi
    span = hi - lo
    if span <= 0:
        return BLOCKS[0] * len(vals)
    out = []
    for v in vals:
        i = int((min(max(v, lo), hi) - lo) / span * (len(BLOCKS) - 1))
        out.append(BLOCKS[i])
    return "".join(out)


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pct(d: Any, key: str) -> str:
    return _num(d.get(key)) if isinstance(d, dict) else "-"


class History:
    def __init__(self, depth: int = 40) -> None:
        self.depth = depth
        self.series: dict[str, collections.deque[float]] = {}

    def add(self, key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        self.series.setdefault(key, collections.deque(maxlen=self.depth)).append(float(value))

    def get(self, key: str) -> list[float]:
        return list(self.series.get(key, ()))


def build_view(
    st: dict[str, Any], hist: History, warnings: list[dict[str, Any]], width: int, height: int
) -> Group:
    gw = st.get("gateway") or {}
    header = Text(
        f"edgerund {st.get('version')} {gw.get('id', '?')}@{gw.get('site', '?')}  "
        f"up {st.get('uptime_s', 0):.0f}s  lag {st.get('loop_lag_ms', 0):.2f}ms"
        + ("  SIMULATED" if st.get("simulate") else ""),
        style="bold reverse",
        no_wrap=True,
        overflow="ellipsis",
    )
    spark_w = 12 if width < 100 else 20

    sensors = Table(box=None, pad_edge=False, expand=False, show_edge=False, header_style="bold")
    for col, kw in (
        ("sensor", {"no_wrap": True, "max_width": 14}),
        ("state", {"no_wrap": True}),
        ("value", {"justify": "right"}),
        ("unit", {"no_wrap": True, "max_width": 8}),
        ("recent", {"no_wrap": True}),
        ("err", {"justify": "right"}),
    ):
        sensors.add_column(col, **kw)
    rows = st.get("sensors") or []
    for s in rows:
        sid = str(s.get("id"))
        first, unit, more = primary_channel(s)
        hist.add(f"s:{sid}", first)
        state = str(s.get("state", "?"))
        style = {"ok": "green", "failed": "bold red", "starting": "yellow"}.get(state, "")
        sensors.add_row(
            sid,
            Text(state, style=style),
            _num(first) + (f" +{more}" if more else ""),
            unit,
            sparkline(hist.get(f"s:{sid}"), spark_w),
            _num(s.get("read_errors")),
        )

    loops = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for col in ("loop", "mode", "ticks", "miss", "late p50/p99", "lat p99", "score"):
        loops.add_column(col, no_wrap=True)
    for lp in st.get("loops") or []:
        lid = str(lp.get("id"))
        hist.add(f"l:{lid}", lp.get("score"))
        thr = lp.get("threshold")
        scores = lp.get("scores") or lp.get("recent_scores") or hist.get(f"l:{lid}")
        hi = max(
            [
                *(v for v in scores if isinstance(v, (int, float))),
                *([thr * 1.5] if isinstance(thr, (int, float)) else []),
            ],
            default=None,
        )
        spark = sparkline(list(scores), spark_w, 0.0, hi)
        over = (
            isinstance(thr, (int, float))
            and isinstance(lp.get("score"), (int, float))
            and lp["score"] > thr
        )
        mode = str(lp.get("mode", "?"))
        loops.add_row(
            lid,
            Text(mode, style="yellow" if mode != "model" else "green"),
            _num(lp.get("ticks")),
            _num(lp.get("missed")),
            f"{_pct(lp.get('lateness_ms'), 'p50')}/{_pct(lp.get('lateness_ms'), 'p99')}",
            _pct(lp.get("latency_ms"), "p99"),
            Text(f"{spark} {_num(lp.get('score'))}/{_num(thr)}", style="bold red" if over else ""),
        )

    models = (
        ", ".join(
            f"{m.get('name')} v{m.get('version')} slot {m.get('active_slot', '-')} "
            f"{m.get('state', '')}"
            for m in st.get("models") or []
        )
        or "none"
    )
    ident = st.get("identity") or {}
    tel = st.get("telemetry") or {}
    lines = [
        Text(f"models: {models}", no_wrap=True, overflow="ellipsis"),
        Text(
            f"identity: {ident.get('kind')} {ident.get('key_id') or ''}"
            + (" INSECURE" if ident.get("insecure") else ""),
            no_wrap=True,
            overflow="ellipsis",
        ),
        Text(
            f"uplink: {'connected' if tel.get('connected') else 'OFFLINE'} "
            f"{tel.get('broker', '')} backlog {tel.get('backlog_batches', 0)} "
            f"sent {tel.get('sent_batches', 0)} lost {tel.get('lost_samples', 0)}",
            style="" if tel.get("connected") else "yellow",
            no_wrap=True,
            overflow="ellipsis",
        ),
    ]
    budget = max(0, height - 8 - len(rows) - len(st.get("loops") or []))
    warn_lines = (
        [
            Text(
                f"! {w.get('timestamp', '')[11:19]} {w.get('event')} "
                + " ".join(
                    f"{k}={v}"
                    for k, v in w.items()
                    if k not in ("timestamp", "event", "level", "logger")
                ),
                style="yellow",
                no_wrap=True,
                overflow="ellipsis",
            )
            for w in warnings[-min(3, budget) :]
        ]
        if budget
        else []
    )
    return Group(header, sensors, loops, *lines, *warn_lines)


def primary_channel(sensor: dict[str, Any]) -> tuple[Any, str, int]:
    """(value, unit, number of further channels) of a sensor's first channel."""
    chans = sensor.get("channels") or []
    if chans and isinstance(chans[0], dict):
        return chans[0].get("value"), str(chans[0].get("unit") or ""), len(chans) - 1
    return sensor.get("value"), str(sensor.get("unit") or ""), 0


def plain_table(st: dict[str, Any]) -> str:
    out = [
        f"{time.strftime('%H:%M:%S')} edgerund {st.get('version')} lag "
        f"{st.get('loop_lag_ms', 0):.2f} ms"
    ]
    for s in st.get("sensors") or []:
        out.append(
            f"  sensor {s.get('id')}: {s.get('state')} {_num(s.get('value'))} "
            f"{s.get('unit') or ''} errors {_num(s.get('read_errors'))}"
        )
    for lp in st.get("loops") or []:
        out.append(
            f"  loop {lp.get('id')}: {lp.get('mode', '?')} ticks {_num(lp.get('ticks'))} "
            f"missed {_num(lp.get('missed'))} score {_num(lp.get('score'))}/"
            f"{_num(lp.get('threshold'))}"
        )
    tel = st.get("telemetry") or {}
    out.append(
        f"  uplink {'connected' if tel.get('connected') else 'offline'} backlog "
        f"{tel.get('backlog_batches', 0)}"
    )
    return "\n".join(out)


@contextlib.contextmanager
def _keys() -> Iterator[bool]:
    """cbreak mode on stdin so 'q' quits without Enter; False when stdin is no terminal."""
    if not sys.stdin.isatty():
        yield False
        return
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def _wait_key(interval: float, keys: bool) -> bool:
    """Sleep for the interval; True if the user pressed q."""
    if not keys:
        time.sleep(interval)
        return False
    r, _, _ = select.select([sys.stdin], [], [], interval)
    return bool(r) and sys.stdin.read(1).lower() == "q"


def run_top(
    client: DiagClient,
    console: Console,
    interval_s: float = 0.3,
    iterations: int = 0,
    plain: bool | None = None,
) -> int:
    dumb = os.environ.get("TERM", "") in ("", "dumb") or not console.is_terminal
    if plain is None:
        plain = dumb
    err = Console(stderr=True, soft_wrap=True)
    if not plain:
        w, h = console.size
        if w < MIN_COLS or h < MIN_ROWS:
            err.print(
                f"edgerunctl top: terminal is {w}x{h}; needs at least "
                f"{MIN_COLS}x{MIN_ROWS} (or use --plain)",
                markup=False,
            )
            return 2
    hist = History()
    warnings: list[dict[str, Any]] = []
    n = 0
    try:
        if plain:
            while True:
                st = client.call("status")
                print(plain_table(st), flush=True)
                n += 1
                if iterations and n >= iterations:
                    return 0
                time.sleep(max(interval_s, 1.0))
        with (
            _keys() as keys,
            Live(console=console, screen=True, auto_refresh=False, transient=True) as live,
        ):
            while True:
                st = client.call("status")
                if n % 10 == 0:
                    warnings = client.call("log", {"n": 5, "level": "warning"})
                w, h = console.size
                live.update(build_view(st, hist, warnings, w, h), refresh=True)
                n += 1
                if iterations and n >= iterations:
                    return 0
                if _wait_key(interval_s, keys):
                    return 0
    except KeyboardInterrupt:
        return 0
    except Unreachable as exc:
        err.print(f"edgerunctl top: {exc}", markup=False)
        return 2
    except CommandError as exc:
        err.print(f"edgerunctl top: {exc.message} [{exc.code}]", markup=False)
        return 1
