"""`edgerunctl`: the field technician's client of the diagnostics socket.

Every command is a request on the socket (README.md, "Diagnostics socket"); one table
lists them, so a new socket command is usable the day it exists (`edgerunctl call CMD`).
Output is a human table by default (edgerund/ctl/render.py) and the daemon's JSON result
with `--json`. Exit codes: 0 success, 1 the daemon answered with an error (or an update
ended rolled back or rejected: edgerund/ctl/update.py), 2 the daemon cannot be reached
(or bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

from edgerund import __version__
from edgerund.ctl import local, update
from edgerund.ctl.client import DiagClient, Unreachable, default_socket
from edgerund.ctl.render import (
    calibration_lines,
    model_row,
    provider_lines,
    render,
    render_log,
    render_sniff,
    render_status,
    sensors_rows,
    table,
)
from edgerund.errors import CommandError

EXIT_OK, EXIT_REMOTE, EXIT_UNREACHABLE = 0, 1, 2


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


def _add_wide(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wide", action="store_true", help="every channel and counter, no width limit")


SIMPLE: list[RemoteCommand] = [
    ("status", "summary of every component", lambda p: None, _no_args),
    (
        "sensors",
        "every sensor: state, main value, age, rate, errors (--wide: all channels)",
        _add_wide,
        _no_args,
    ),
    ("loops", "control loops: ticks, misses, lateness, latency, mode", lambda p: None, _no_args),
    ("models", "models: active slot, version, state, last failure", lambda p: None, _no_args),
    ("telemetry", "uplink: connected, broker, backlog, sent, lost", lambda p: None, _no_args),
    ("identity", "device identity: kind, key id, AK name", lambda p: None, _no_args),
    ("reload", "re-read the config file (like SIGHUP)", lambda p: None, _no_args),
    (
        "config",
        "effective config, each key with its origin (file or twin version N)",
        lambda p: None,
        _no_args,
    ),
    ("help", "commands the daemon serves", lambda p: None, _no_args),
    (
        "tasks",
        "what every task of the daemon waits on, down the await chain (a stuck component)",
        lambda p: None,
        _no_args,
    ),
]


def _add_attest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nonce", required=True, help="verifier's nonce, hex, at most 64 bytes")


def _add_update(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="bundle file (read by the daemon; give a path it can read)")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the trial started, without waiting for the probation verdict",
    )
    p.add_argument(
        "--override-twin",
        action="store_true",
        help="install it even though a twin model target pins the model to another version"
        " (reported upstream as an override; the next desired version decides)",
    )


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
    # the daemon checks the kind and answers with the list it can play (sim-inject)
    p.add_argument("kind", help="bearing_wear, overheat, dropout, gain_drift, ... ")
    p.add_argument("--duration-s", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--severity", type=float, default=1.0, help="1.0 = nominal fault")
    p.add_argument("--sensor", help="for dropout: the sensor id or emulated device")
    p.add_argument("--start-in-s", type=float, default=0.0, help="delay before it starts")


def _add_adapt(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the model's config name")
    p.add_argument("--dry-run", action="store_true", help="fit and check, show what would change")
    p.add_argument(
        "--force",
        action="store_true",
        help="skip the signed cooldown_s (technician on site; logged); nothing else",
    )
    p.add_argument(
        "--wait",
        choices=["none", "trial", "commit"],
        default="trial",
        help="answer once the calibration is on trial (default), committed, or at once",
    )


def _adapt_args(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"model": a.model, "dry_run": bool(a.dry_run), "wait": a.wait}
    if a.force:
        out["force"] = True
    return out


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
        "install a signed model bundle and wait for its verdict: exit 0 committed, "
        "1 rejected or rolled back (root or edgerund group)",
        _add_update,
        lambda a: {"path": _abs(a.path), **({"override_twin": True} if a.override_twin else {})},
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
        "adapt",
        "fit a calibration of MODEL to the recent normal data, inside its signed policy, and"
        " install it as a X+cal.N slot through precheck/probation (root or edgerund group)",
        _add_adapt,
        _adapt_args,
    ),
    (
        "sim-inject",
        "simulated mode: inject an anomaly into the running plant (root / group edgerund)",
        _add_inject,
        _inject_args,
    ),
]


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
        if args.remote == "update" and not args.no_wait:
            result = update.wait_final(
                client, result, lambda m: err.print(f"edgerunctl: update: {m}", markup=False)
            )
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
        render_log(console, result)
    elif cmd == "sensors" and isinstance(result, list):
        wide = bool(getattr(args, "wide", False))
        out = Console(highlight=False, soft_wrap=True, width=10_000) if wide else console
        if result:
            out.print(
                table(sensors_rows(result, wide), "sensors", max_width=None if wide else out.width)
            )
        else:
            out.print("sensors: none configured", markup=False)
    elif cmd == "models" and isinstance(result, list):
        console.print(table([model_row(r) for r in result], "models", max_width=console.width))
        for line in calibration_lines(result):
            console.print(line, markup=False, highlight=False)
        for line in provider_lines(result):
            console.print(line, markup=False, highlight=False)
    elif cmd == "loops" and isinstance(result, list):
        from edgerund.control.render import format_loops

        console.print(format_loops(result), markup=False, highlight=False)
    elif cmd == "tasks" and isinstance(result, list):
        for row in result:
            console.print(f"{row['name']} [{row['state']}]", markup=False, highlight=False)
            for hop in row["awaits"]:
                console.print(f"    {hop}", markup=False, highlight=False)
    elif cmd == "serial-sniff":
        render_sniff(console, result)
    elif cmd == "config" and isinstance(result, dict):
        from edgerund.ctl.config_view import render_config

        render_config(console, result)
    else:
        render(console, result, cmd)
    if cmd == "update" and (failure := update.verdict(result)) is not None:
        err.print(f"edgerunctl: update: {failure}", markup=False)
        return EXIT_REMOTE
    return EXIT_OK
