"""`python -m edgerund.toolkit.crashsim [--limit N] [--keep-failed DIR] [--json]`: record the
update and spool scenarios under strace, check every distinct crash state (or a sample of
N per scenario), print a summary per scenario and, last, one JSON line of the figures.
Exit 1 when any state is inconsistent. `make crash-check` runs it in full."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

from edgerund.toolkit.crashsim import check


def figures(limit: int | None, keep_failed: Path | None, work: Path) -> dict[str, Any]:
    # Recovery logs every state it repairs: thousands of lines that say nothing here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    upd = check.run_update(work, limit=limit, keep_failed=keep_failed)
    spl = check.run_spool(work, limit=limit, keep_failed=keep_failed)
    for rep in (upd, spl):
        print(
            f"  {rep.scenario}: {rep.states_checked} states checked, "
            f"{len(rep.inconsistent)} inconsistent ({rep.seconds:.1f} s)"
        )
    return {
        "crash_states_checked": upd.states_checked + spl.states_checked,
        "crash_states_inconsistent": len(upd.inconsistent) + len(spl.inconsistent),
        "crash_states_update": upd.states_checked,
        "crash_states_spool": spl.states_checked,
        "crash_check_s": round(upd.seconds + spl.seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgerund.toolkit.crashsim")
    ap.add_argument("--limit", type=int, default=None, help="states per scenario (sample)")
    ap.add_argument("--keep-failed", type=Path, default=None, help="save failing states here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crashsim-") as tmp:
        out = figures(args.limit, args.keep_failed, Path(tmp))
    print(json.dumps(out))
    return 1 if out["crash_states_inconsistent"] else 0


if __name__ == "__main__":
    sys.exit(main())
