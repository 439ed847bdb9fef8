"""`edgerunctl update`: wait for the update's verdict and turn it into the exit code.

The daemon's `update` command (default `wait: "trial"`) answers once the new model runs
its trial, i.e. while the probation that decides its fate is still going, or with an
error when the bundle was refused before. A technician or a script reading exit 0 then
takes a later rollback for success. So, unless `--no-wait`, the client keeps asking
`models-slots` until the model's record leaves the in-flight states and judges that
final state: COMMITTED is success (exit 0); ROLLED_BACK or REJECTED is a failure (exit 1)
with the recorded reason. Ctrl-C stops the waiting, not the update. The judgement is the
pure `verdict()`; `wait_final()` only polls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edgerund.ctl.client import DiagClient

IN_FLIGHT = frozenset({"RECEIVED", "VERIFIED", "STAGED", "PRECHECKED", "TRIAL", "PROBATION"})
FAILED = frozenset({"ROLLED_BACK", "REJECTED"})
POLL_S = 0.5


def verdict(result: Any) -> str | None:
    """None if `result` (the `update` answer or a final slot summary) is a success, else
    the reason to report."""
    if not isinstance(result, dict) or "state" not in result:
        return None  # a keyring rotation, or `wait: none`: nothing to judge
    state = str(result.get("state"))
    if state not in FAILED:
        return None
    lf = result.get("last_failure") or {}
    reason = lf.get("reason", "unknown") if isinstance(lf, dict) else "unknown"
    message = lf.get("message", "") if isinstance(lf, dict) else ""
    return f"{result.get('name')} {state}: {reason}" + (f": {message}" if message else "")


def wait_final(
    client: DiagClient, result: Any, notify: Callable[[str], None], poll_s: float = POLL_S
) -> Any:
    """Poll until the model named in `result` is no longer in flight; its final summary."""
    if not isinstance(result, dict) or str(result.get("state")) not in IN_FLIGHT:
        return result
    name = result.get("name")
    notify(
        f"{name}: {result.get('state')}; waiting for the probation verdict "
        "(Ctrl-C stops waiting, not the update)"
    )
    while True:
        time.sleep(poll_s)
        slots = client.call("models-slots")
        current = next(
            (s for s in slots or [] if isinstance(s, dict) and s.get("name") == name), None
        )
        if current is None:
            return result
        if str(current.get("state")) not in IN_FLIGHT:
            return current
