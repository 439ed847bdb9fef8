"""edgerunctl subcommands that run locally: top, check, support-bundle, metrics."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from edgerund.config.loader import simulate_config_path
from edgerund.config.schema import DEFAULT_CONFIG_PATH
from edgerund.ctl.client import SIMULATE_SOCKET, DiagClient, Unreachable
from edgerund.errors import CommandError
from edgerund.toolkit import check, support_bundle, top


def _top(args: argparse.Namespace, client: DiagClient, console: Console) -> int:
    return top.run_top(
        client, console, args.interval, args.iterations, True if args.plain else None
    )


def _config_guess(args: argparse.Namespace, client: DiagClient) -> Path:
    if args.config:
        return Path(args.config)
    if client.path == SIMULATE_SOCKET:
        return simulate_config_path()
    return Path(DEFAULT_CONFIG_PATH)


def _check(args: argparse.Namespace, client: DiagClient, console: Console) -> int:
    st: dict[str, Any] | None = None
    later: dict[str, Any] | None = None
    error = None
    try:
        st = client.call("status")
        time.sleep(1.0)  # a second sample: rates and misses over a window, not since start
        later = client.call("status")
    except (Unreachable, CommandError) as exc:
        error = str(exc)
    cfg_path = (
        Path(args.config)
        if args.config
        else (
            Path(str(st["config_path"]))
            if st and st.get("config_path")
            else _config_guess(args, client)
        )
    )
    results = check.run_checks(cfg_path, st, error, later)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        style = {check.OK: "green", check.WARN: "yellow", check.FAIL: "bold red"}
        for r in results:
            console.print(f"[{style[r.level]}]{r.level:4}[/] {r.name:8} ", end="")
            console.print(r.message, markup=False, highlight=False)
            if r.fix and r.level != check.OK:
                console.print(f"              -> {r.fix}", markup=False, highlight=False)
    return check.worst(results)


def _support_bundle(args: argparse.Namespace, client: DiagClient, console: Console) -> int:
    out = Path(args.output)
    try:
        members = support_bundle.collect(client, _config_guess(args, client))
        support_bundle.write_bundle(out, members)
    except support_bundle.SecretLeak as exc:
        print(f"edgerunctl support-bundle: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edgerunctl support-bundle: cannot write {out}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"{out}: {len(members)} files ({', '.join(sorted(members))})")
    return 0


def _metrics(args: argparse.Namespace, client: DiagClient, console: Console) -> int:
    result = client.call("metrics")
    text = result.get("text", "") if isinstance(result, dict) else str(result)
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write(text)
    return 0


def _discover(args: argparse.Namespace, client: DiagClient, console: Console) -> int:
    from edgerund.toolkit import discover

    opts = discover.options_from_args(args)
    try:
        sensors = client.call("sensors")
    except Unreachable:
        sensors = []  # the daemon is down: nothing is in use, probe everything
    if isinstance(sensors, list):
        opts.in_use_i2c, opts.in_use_ports = discover.in_use_from_sensors(sensors)
    return discover.run(opts)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    t = sub.add_parser(
        "top",
        help="live full-screen view (q or Ctrl-C quits)",
        description="Live view of sensors, loops, models, identity and "
        "uplink. Falls back to a plain table in a dumb terminal.",
    )
    t.add_argument("--interval", type=float, default=0.3, help="seconds between refreshes")
    t.add_argument("--iterations", type=int, default=0, help="stop after N refreshes")
    t.add_argument("--plain", action="store_true", help="plain periodic table")
    t.set_defaults(local=_top)

    c = sub.add_parser(
        "check",
        help="named health checks; exit 0 OK, 1 WARN, 2 FAIL",
        description="Health checks with explanations and fixes. Works with "
        "the daemon down (from the config file).",
    )
    c.add_argument(
        "-c", "--config", help=f"config file (default: the daemon's, else {DEFAULT_CONFIG_PATH})"
    )
    c.set_defaults(local=_check)

    b = sub.add_parser(
        "support-bundle",
        help="write a tar.gz for remote diagnosis",
        description="Versions, redacted config, status, logs, checks, models, "
        "spool statistics, journal. Never key material.",
    )
    b.add_argument("-o", "--output", required=True, help="output file (.tar.gz)")
    b.add_argument("-c", "--config", help="config file if the daemon is down")
    b.set_defaults(local=_support_bundle)

    d = sub.add_parser(
        "discover",
        help="find what is wired (read-only) and print a sensors: fragment",
        description="Asks the daemon which I2C addresses and serial ports it uses and "
        "leaves those alone; probes the rest read-only (works with the daemon down too).",
    )
    from edgerund.toolkit import discover

    discover.add_arguments(d)
    d.set_defaults(local=_discover)

    m = sub.add_parser("metrics", help="all counters and histograms, Prometheus text format")
    m.set_defaults(local=_metrics)
