"""`edgerunctl`, the field technician's client of the diagnostics socket: its one home.

- `client`: `DiagClient`, the synchronous JSON-lines client of the socket (also used by
  tests and tools), and the choice of which socket to trust (`default_socket`).
- `cli`: the command line: one subcommand per socket command, rendering, exit codes.
- `local`: subcommands that do more than one request or work with the daemon down
  (`top`, `check`, `support-bundle`, `metrics`); their engines live in `edgerund.toolkit`.

The `edgerunctl` entry point is `edgerund.ctl:main`; `python -m edgerund.ctl` runs it too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

# The command line (and rich, which renders it) loads only when edgerunctl runs: the daemon
# imports `ctl.client` for the twin's support bundle and must not pay for, or be able to
# load, the renderer (edgerund/cli.py blocks rich under systemd).


def build_parser() -> argparse.ArgumentParser:
    from edgerund.ctl.cli import build_parser as build

    return build()


def main(argv: Sequence[str] | None = None) -> int:
    from edgerund.ctl.cli import main as run

    return run(argv)
