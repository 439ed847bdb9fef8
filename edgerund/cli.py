"""`edgerund`: run the daemon, validate configs, and the admin and fleet tools.

Exit codes: 0 success, 1 failure at run time, 2 bad input (config, arguments, files).
Subcommands of capabilities (bundle, telemetry, attest) live beside their code, each
module exposing `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edgerund import __version__
from edgerund.config.loader import load_config, simulate_config_path
from edgerund.config.schema import DEFAULT_CONFIG_PATH
from edgerund.errors import ConfigError


def _config_path(args: argparse.Namespace) -> Path:
    if args.config:
        return Path(args.config)
    if getattr(args, "simulate", False):
        return simulate_config_path()
    return Path(DEFAULT_CONFIG_PATH)


def _without_rich() -> None:
    """Keep `rich` out of the daemon's process when nothing will render with it.

    structlog imports rich (for pretty tracebacks) as soon as structlog itself is
    imported, whatever renderer is configured: ~40 ms and several MB at start-up, used only
    by the console renderer on a terminal. Under systemd (stderr is the journal, not a
    TTY) the daemon logs JSON, so rich is marked absent before structlog is imported;
    structlog then formats tracebacks itself. `logging.format: console` without a TTY
    still works, with plain tracebacks.
    """
    if "rich" not in sys.modules and not sys.stderr.isatty():
        sys.modules["rich"] = None  # type: ignore[assignment]  # import raises ImportError


def cmd_run(args: argparse.Namespace) -> int:
    _without_rich()
    from edgerund.main import run

    return run(_config_path(args), simulate=args.simulate)


def cmd_check_config(args: argparse.Namespace) -> int:
    path = _config_path(args)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not args.quiet:
        print(
            f"{path}: OK (gateway {cfg.gateway.id}, {len(cfg.sensors)} sensors, "
            f"{len(cfg.loops)} loops, {len(cfg.models)} models, identity "
            f"{cfg.identity.kind})"
        )
    return 0


def build_parser(with_tools: bool = True) -> argparse.ArgumentParser:
    """The CLI; `with_tools=False` leaves out discover and the publisher and backend subcommands (whose
    imports `edgerund run` does not need)."""
    p = argparse.ArgumentParser(
        prog="edgerund",
        description="Edge runtime daemon for IoT gateways. `edgerund run` is what systemd "
        "starts; the other commands are admin and fleet tools.",
    )
    p.add_argument("--version", action="version", version=f"edgerund {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="run the daemon in the foreground",
        description="Run the daemon in the foreground (systemd: Type=notify).",
    )
    r.add_argument(
        "-c",
        "--config",
        help=f"config file (default {DEFAULT_CONFIG_PATH}; "
        "with --simulate the shipped simulated config)",
    )
    r.add_argument(
        "--simulate",
        action="store_true",
        help="emulated sensors, the reference model, local spool: no hardware",
    )
    r.set_defaults(func=cmd_run)

    c = sub.add_parser(
        "check-config",
        help="validate a config file (exit 0 or 2)",
        description="Validate a config file. Errors: FILE:LINE: key: message.",
    )
    c.add_argument("-c", "--config", help=f"config file (default {DEFAULT_CONFIG_PATH})")
    c.add_argument("--simulate", action="store_true", help="check the shipped simulated config")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    c.set_defaults(func=cmd_check_config)

    if not with_tools:
        return p
    d = sub.add_parser(
        "discover",
        help="probe buses and ports read-only, print a sensors: fragment",
        description="Probe I2C buses, serial ports (NMEA), a named Modbus port, 1-Wire "
        "probes, GPIO and PWM chips, read-only, and print a commented YAML fragment that "
        "check-config accepts. For a daemon that is not running; with the daemon running "
        "use `edgerunctl discover` (it leaves the daemon's buses and ports alone).",
    )
    from edgerund.toolkit import discover

    discover.add_arguments(d)
    d.set_defaults(func=lambda a: discover.run(discover.options_from_args(a)))

    # Publisher and backend tools live in their own packages, which the daemon never
    # imports; imported here, not at module load, and not at all for `edgerund run`.
    from edgerund.backend import attest_cli, fleet_cli, telemetry_cli, twin_cli
    from edgerund.publisher import cli as publisher_cli

    for tools in (publisher_cli, telemetry_cli, attest_cli, fleet_cli, twin_cli):
        tools.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    first = list(sys.argv[1:2] if argv is None else argv[:1])
    parser = build_parser(with_tools=first != ["run"])
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
