"""Write a man page (roff) for edgerund or edgerunctl from their argparse definitions,
so the pages never disagree with --help."""

from __future__ import annotations

import argparse
import datetime
import sys

from edgerund import __version__


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("\n.", "\n\\&.")


def page(prog: str, section: str) -> str:
    if prog == "edgerund":
        from edgerund.cli import build_parser
    else:
        from edgerund.ctl import build_parser
    parser = build_parser()
    date = datetime.date(2026, 1, 1).isoformat()
    out = [f'.TH {prog.upper()} {section} "{date}" "edgerund {__version__}" "edgerund"']
    out += [".SH NAME", f"{prog} \\- {_esc((parser.description or '').split('.')[0])}"]
    out += [".SH SYNOPSIS", ".nf", _esc(parser.format_usage().replace("usage: ", "")), ".fi"]
    out += [".SH DESCRIPTION", _esc(parser.description or "")]
    out += [".SH OPTIONS", ".nf", _esc(parser.format_help().split("\n\n", 1)[-1]), ".fi"]
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        out.append(".SH COMMANDS")
        for name, sp in subs[0].choices.items():
            out += [f".SS {_esc(name)}", ".nf", _esc(sp.format_help()), ".fi"]
    out += [".SH FILES", ".TP", "/etc/edgerund/edgerund.yaml", "configuration (YAML)",
            ".TP", "/var/lib/edgerund/", "state: models, telemetry spool, identity",
            ".TP", "/run/edgerund/diag.sock", "diagnostics socket (group edgerund)"]
    out += [".SH EXIT STATUS",
            "0 success; 1 failure (edgerunctl: the daemon answered with an error); "
            "2 bad input or configuration (edgerunctl: the daemon cannot be reached)."]
    out += [".SH SEE ALSO", "edgerund(8), edgerunctl(1), /usr/share/doc/edgerund/README.md"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page(sys.argv[1], sys.argv[2]))
