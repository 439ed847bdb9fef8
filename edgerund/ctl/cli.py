"""`edgerunctl`: the field technician's client of the diagnostics socket.

Every command is a request on the socket (DESIGN.md §4). Output is a human table by
default and the daemon's JSON result with `--json`. Exit codes: 0 success, 1 the daemon
answered with an error, 2 the daemon cannot be reached (or bad arguments).

Rendering is generic: a list of flat records becomes a table (nested {p50,p99,max}
figures are shown as "p50/p99/max"), a mapping becomes aligned `key: value` lines, so a
new socket command is usable from edgerunctl the day it exists (`edgerunctl call CMD`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from edgerund import __version__
from edgerund.ctl import local
from edgerund.ctl.client import DiagClient, Unreachable, default_socket
from edgerund.errors import CommandError

EXIT_OK, EXIT_REMOTE, EXIT_UNREACHABLE = 0, 1, 2


# ----------------------------------------------------------------------------- rendering


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    if isinstance(v, dict):
        if {"p50", "p99", "max"} <= v.keys():
            return f"{_fmt(v['p50'])}/{_fmt(v['p99'])}/{_fmt(v['max'])}"
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        if len(v) > 8 and all(isinstance(x, (int, float)) for x in v):
            return f"[{len(v)} values]"
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def table(
    rows: list[dict[str, Any]], title: str | None = None, columns: Sequence[str] | None = None
) -> Table:
    cols: list[str] = list(columns) if columns else []
    if not cols:
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
    t = Table(
        title=title,
        title_justify="left",
        box=None,
        pad_edge=False,
        show_edge=False,
        header_style="bold",
    )
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(_fmt(r.get(c)) for c in cols))
    return t


def _kv(d: dict[str, Any], indent: int = 0) -> list[str]:
    lines: list[str] = []
    width = max((len(str(k)) for k in d), default=0)
    for k, v in d.items():
        pad = " " * indent
        if isinstance(v, dict) and not ({"p50", "p99", "max"} <= v.keys()) and len(v) > 3:
            lines.append(f"{pad}{k}:")
            lines.extend(_kv(v, indent + 2))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"{pad}{k}: ({len(v)})")
            for item in v:
                lines.append(f"{pad}  - " + ", ".join(f"{a}={_fmt(b)}" for a, b in item.items()))
        else:
            lines.append(f"{pad}{str(k).ljust(width)}  {_fmt(v)}")
    return lines


def render(console: Console, result: Any, title: str | None = None) -> None:
    if isinstance(result, list) and all(isinstance(r, dict) for r in result):
        if result:
            console.print(table(result, title))
        else:
            console.print(f"{title or 'result'}: none")
    elif isinstance(result, dict):
        console.print("\n".join(_kv(result)), markup=False, highlight=False)
    else:
        console.print(_fmt(result), markup=False, highlight=False)


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
        value: Any = f"{_fmt(chans[0].get('value'))}{more}"
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


def _model_row(m: dict[str, Any]) -> dict[str, Any]:
    """The columns a technician reads; --json has everything."""
    return {
        "name": m.get("name"),
        "version": m.get("version"),
        "slot": m.get("active_slot"),
        "state": m.get("state"),
        "precision": m.get("precision"),
        "runs": m.get("inferences"),
        "faults": m.get("faults"),
        "NaN": m.get("nan_outputs"),
        "us p50/p99": f"{_fmt(m.get('infer_p50_us'))}/{_fmt(m.get('infer_p99_us'))}",
        "last error": m.get("last_error"),
    }


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
        "score": f"{_fmt(score)}/{_fmt(thr)}" if thr is not None else _fmt(score),
    }


def render_status(console: Console, st: dict[str, Any]) -> None:
    ident = st.get("identity") or {}
    tel = st.get("telemetry") or {}
    gw = st.get("gateway") or {}
    console.print(
        f"edgerund {st.get('version')}  gateway {gw.get('id', '?')} (site {gw.get('site', '?')})"
        f"  up {st.get('uptime_s', 0):.0f} s  loop lag {st.get('loop_lag_ms', 0):.2f} ms"
        + ("  [SIMULATED]" if st.get("simulate") else ""),
        markup=False,
        highlight=False,
    )
    console.print(
        f"identity: {ident.get('kind')} key {ident.get('key_id') or '-'}"
        + ("  (INSECURE software key)" if ident.get("insecure") else ""),
        markup=False,
        highlight=False,
    )
    console.print(
        f"telemetry: {'connected' if tel.get('connected') else 'offline'}, "
        f"backlog {tel.get('backlog_batches', 0)} batches, sent "
        f"{tel.get('sent_batches', 0)}, lost samples {tel.get('lost_samples', 0)}",
        markup=False,
        highlight=False,
    )
    for key, cols in _STATUS_COLUMNS.items():
        rows = st.get(key) or []
        if key == "sensors":
            rows = [_sensor_row(r) for r in rows]
        elif key == "loops":
            rows = [_loop_row(r) for r in rows]
        console.print()
        if rows:
            console.print(table(rows, key, [c for c in cols if any(c in r for r in rows)]))
        else:
            console.print(f"{key}: none configured", markup=False, highlight=False)
        if key == "models":  # only when a model is not on the provider it asked for first
            for line in provider_lines(rows, only_fallbacks=True):
                console.print(line, markup=False, highlight=False)


# ----------------------------------------------------------------------------- commands

# (command, help, add its arguments to the subparser, build the request's args)
RemoteCommand = tuple[
    str,
    str,
    Callable[[argparse.ArgumentParser], None],
    Callable[[argparse.Namespace], dict[str, Any]],
]


def _no_args(a: argparse.Namespace) -> dict[str, Any]:
    return {}


SIMPLE: list[RemoteCommand] = [
    ("status", "summary of every component", lambda p: None, _no_args),
    ("sensors", "every sensor: state, value, age, rate, errors", lambda p: None, _no_args),
    ("loops", "control loops: ticks, misses, lateness, latency, mode", lambda p: None, _no_args),
    ("models", "models: active slot, version, state, last failure", lambda p: None, _no_args),
    ("telemetry", "uplink: connected, broker, backlog, sent, lost", lambda p: None, _no_args),
    ("identity", "device identity: kind, key id, AK name", lambda p: None, _no_args),
    ("reload", "re-read the config file (like SIGHUP)", lambda p: None, _no_args),
    ("help", "commands the daemon serves", lambda p: None, _no_args),
]


def _add_attest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nonce", required=True, help="verifier's nonce, hex, at most 64 bytes")


def _add_update(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="bundle file (read by the daemon; give a path it can read)")


def _add_rollback(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name")


def _add_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, default=50, help="how many events (default 50)")
    p.add_argument(
        "--level",
        choices=["debug", "info", "warning", "error"],
        help="only events at this level or above",
    )


def _add_scan(p: argparse.ArgumentParser) -> None:
    p.add_argument("bus", type=int, help="I2C bus number (/dev/i2c-N)")


def _add_sniff(p: argparse.ArgumentParser) -> None:
    p.add_argument("port", help="serial port as configured (path or URL)")
    p.add_argument("-n", type=int, default=20, help="how many recent frames (default 20)")


def _add_inject(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["bearing_wear", "overheat", "voltage_sag", "dropout"])
    p.add_argument("--duration-s", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--severity", type=float, default=1.0, help="1.0 = nominal fault")
    p.add_argument("--sensor", help="for dropout: the sensor id or emulated device")
    p.add_argument("--start-in-s", type=float, default=0.0, help="delay before it starts")


def _inject_args(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": a.kind,
        "duration_s": a.duration_s,
        "severity": a.severity,
        "start_in_s": a.start_in_s,
    }
    if a.sensor:
        out["sensor"] = a.sensor
    return out


def _abs(path: str) -> str:
    return os.path.abspath(path)


WITH_ARGS: list[RemoteCommand] = [
    (
        "attest",
        "TPM quote over the configured PCRs for a verifier's nonce",
        _add_attest,
        lambda a: {"nonce": a.nonce},
    ),
    (
        "update",
        "install a signed model bundle (root or edgerund group)",
        _add_update,
        lambda a: {"path": _abs(a.path)},
    ),
    (
        "rollback",
        "roll a model back to its other slot (root or edgerund group)",
        _add_rollback,
        lambda a: {"model": a.model},
    ),
    (
        "log",
        "recent log events from the daemon's memory",
        _add_log,
        lambda a: {"n": a.n, **({"level": a.level} if a.level else {})},
    ),
    (
        "i2c-scan",
        "read-only probe of the addresses on an I2C bus",
        _add_scan,
        lambda a: {"bus": a.bus},
    ),
    (
        "serial-sniff",
        "the last raw frames a serial port received",
        _add_sniff,
        lambda a: {"port": a.port, "n": a.n},
    ),
    (
        "sim-inject",
        "simulated mode: inject an anomaly into the running plant (root / group edgerund)",
        _add_inject,
        _inject_args,
    ),
]


def _render_log(console: Console, events: list[dict[str, Any]]) -> None:
    for e in events:
        extra = " ".join(
            f"{k}={_fmt(v)}"
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


def _render_sniff(console: Console, result: Any) -> None:
    frames = result.get("frames", result) if isinstance(result, dict) else result
    for f in frames or []:
        if isinstance(f, dict):
            console.print(
                f"{_clock(f.get('t_wall'))} {f.get('len', ''):>4}  {f.get('hex', '')}  "
                f"|{f.get('text', '')}|",
                markup=False,
                highlight=False,
            )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgerunctl",
        description="Talk to the running edgerund over its diagnostics socket. Exit codes: "
        "0 ok, 1 the daemon answered with an error, 2 it cannot be reached.",
    )
    p.add_argument(
        "--socket",
        default=None,
        help=f"socket path (default $EDGERUND_SOCKET or {default_socket()})",
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON result")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    p.add_argument("--version", action="version", version=f"edgerunctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_, add, to_args in SIMPLE + WITH_ARGS:
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)
        sp.set_defaults(remote=name, to_args=to_args)
    c = sub.add_parser("call", help="send any command: edgerunctl call CMD '{\"k\": 1}'")
    c.add_argument("cmd")
    c.add_argument("args", nargs="?", default="{}", help="JSON object of arguments")
    c.set_defaults(remote=None, to_args=None)
    # Local commands that do more than one request (top, check, support-bundle, metrics).
    local.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_UNREACHABLE
    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    client = DiagClient(args.socket, timeout_s=args.timeout)
    try:
        local = getattr(args, "local", None)
        if local is not None:
            return int(local(args, client, console))
        if args.remote is None:
            try:
                call_args = json.loads(args.args)
            except ValueError as exc:
                err.print(f"edgerunctl: args must be a JSON object: {exc}", markup=False)
                return EXIT_UNREACHABLE
            cmd, cmd_args = args.cmd, call_args
        else:
            cmd, cmd_args = args.remote, args.to_args(args)
        result = client.call(cmd, cmd_args)
    except Unreachable as exc:
        err.print(f"edgerunctl: {exc}", markup=False)
        return EXIT_UNREACHABLE
    except CommandError as exc:
        err.print(
            f"edgerunctl: {cmd if 'cmd' in locals() else args.command}: {exc.message} [{exc.code}]",
            markup=False,
        )
        return EXIT_REMOTE
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=False, default=str))
    elif cmd == "status" and isinstance(result, dict):
        render_status(console, result)
    elif cmd == "log" and isinstance(result, list):
        _render_log(console, result)
    elif cmd == "models" and isinstance(result, list):
        console.print(table([_model_row(r) for r in result], "models"))
        for line in provider_lines(result):
            console.print(line, markup=False, highlight=False)
    elif cmd == "loops" and isinstance(result, list):
        from edgerund.control.render import format_loops

        console.print(format_loops(result), markup=False, highlight=False)
    elif cmd == "serial-sniff":
        _render_sniff(console, result)
    else:
        render(console, result, cmd)
    return EXIT_OK
