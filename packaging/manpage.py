"""Write a man page (roff) for edgerund or edgerunctl from their argparse definitions,
so the pages never disagree with --help.

    python packaging/manpage.py edgerund 8 > edgerund.8

Every subcommand (and nested subcommand, e.g. `bundle keyring create`) gets its own
subsection holding its --help text verbatim (.nf), which argparse already wraps. The date
is SOURCE_DATE_EPOCH's when set (reproducible builds), else today's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterator

from edgerund import __version__

FILES = [
    ("/etc/edgerund/edgerund.yaml", "the configuration (YAML); `edgerund check-config` checks it"),
    ("/var/lib/edgerund/", "state: identity keys, model A/B slots, telemetry spool"),
    ("/run/edgerund/diag.sock", "the diagnostics socket (mode 0660, group edgerund)"),
    ("/usr/share/edgerund/models/", "the shipped models (${EDGERUND_SHARE}/models)"),
    ("/opt/edgerund/", "the self-contained virtualenv the commands run from"),
    ("/usr/share/doc/edgerund/", "README.md and docs/: every config key, the socket protocol"),
]
EXIT = {
    "edgerund": "0 success; 1 failure at run time (systemd restarts the service); 2 bad input "
    "or a condition that needs a human (invalid config, refused start): not restarted.",
    "edgerunctl": "0 success; 1 the daemon answered with an error; 2 the daemon cannot be "
    "reached, or bad arguments.",
}


def _esc(text: str) -> str:
    out = text.replace("\\", "\\e").replace("-", "\\-")
    # A line starting with . or ' would be read as a roff request.
    return "\n".join("\\&" + ln if ln[:1] in (".", "'") else ln for ln in out.split("\n"))


def _subcommands(
    parser: argparse.ArgumentParser, prefix: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subcommands(sub, f"{prefix}{name} ")


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).date().isoformat()
    return datetime.date.today().isoformat()


def page(prog: str, section: str) -> str:
    if prog == "edgerund":
        from edgerund.cli import build_parser
    else:
        from edgerund.ctl import build_parser
    parser = build_parser()
    desc = parser.description or ""
    help_text = parser.format_help()
    # format_help() = usage, description, then the argument groups: keep the groups.
    groups = help_text.split(desc.split(".")[0], 1)[-1].split("\n\n", 1)[-1] if desc else help_text
    out = [f'.TH {prog.upper()} {section} "{_date()}" "edgerund {__version__}" "edgerund"']
    out += [".SH NAME", f"{prog} \\- {_esc(desc.split('.')[0].strip())}"]
    out += [
        ".SH SYNOPSIS",
        ".nf",
        _esc(parser.format_usage().replace("usage: ", "").strip()),
        ".fi",
    ]
    out += [".SH DESCRIPTION", _esc(desc)]
    out += [".SH OPTIONS", ".nf", _esc(groups.rstrip()), ".fi"]
    subs = list(_subcommands(parser, ""))
    if subs:
        out.append(".SH COMMANDS")
        for name, sub in subs:
            out += [f".SS {_esc(name)}", ".nf", _esc(sub.format_help().rstrip()), ".fi"]
    out.append(".SH FILES")
    for path, what in FILES:
        out += [".TP", _esc(path), _esc(what)]
    out += [".SH ENVIRONMENT", ".TP", "EDGERUND_SHARE",
            _esc("where ${EDGERUND_SHARE} in the config points (default /usr/share/edgerund)")]  # fmt: skip
    out += [".SH EXIT STATUS", _esc(EXIT[prog])]
    out += [".SH SEE ALSO", "edgerund(8), edgerunctl(1), systemctl(1), journalctl(1)"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page(sys.argv[1], sys.argv[2]))
