"""What every asyncio task of the daemon is waiting on: the `tasks` diagnostics command.

A component that stops making progress without an error (an uplink connected to nobody, a
loop that no longer ticks) shows nothing in `status` but its counters standing still. This
names the await each task is suspended in, down the whole chain of coroutines it awaits
(`cr_await`), ending at the future or task it waits for: e.g. the uplink session in
`_publish_birth` -> `_signed_meta` -> `Signer.sign_meta` -> a TPM call's future. Plain
`Task.get_stack()` shows only the task's own frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

MAX_DEPTH = 32  # an await chain deeper than this is cut (and says so)


def await_chain(coro: Any, waiter: Any = None) -> list[str]:
    """`qualname file:line` of each coroutine frame from `coro` down to what the innermost
    one awaits: `waiter` (the future its task is suspended on) when given, else the
    awaitable, named by its type."""
    out: list[str] = []
    cur = coro
    for _ in range(MAX_DEPTH):
        frame = getattr(cur, "cr_frame", None) or getattr(cur, "gi_frame", None)
        if frame is None:
            if cur is not None and cur is not coro:
                out.append(_leaf(waiter if waiter is not None else cur))
            return out
        code = frame.f_code
        out.append(
            f"{getattr(code, 'co_qualname', code.co_name)} {code.co_filename}:{frame.f_lineno}"
        )
        nxt = getattr(cur, "cr_await", None)
        if nxt is None:
            nxt = getattr(cur, "gi_yieldfrom", None)
        if nxt is None:
            if waiter is not None and out:
                out.append(_leaf(waiter))
            return out
        cur = nxt
    out.append("... (deeper)")
    return out


def _leaf(obj: Any) -> str:
    if isinstance(obj, asyncio.Task):
        return f"task {obj.get_name()}"
    if isinstance(obj, asyncio.Future):
        return f"future ({'done' if obj.done() else 'pending'})"
    return type(obj).__qualname__


def dump() -> list[dict[str, Any]]:
    """One entry per task of the running loop, sorted by name: name, state, await chain."""
    rows = []
    for t in asyncio.all_tasks():
        coro: Coroutine[Any, Any, Any] | Generator[Any, Any, Any] | Any = t.get_coro()
        # the future a suspended task waits on: asyncio keeps it (C and Python tasks alike)
        # as _fut_waiter; the awaitable in the chain (a FutureIter) does not name it
        waiter = getattr(t, "_fut_waiter", None)
        rows.append(
            {
                "name": t.get_name(),
                "state": "done" if t.done() else "cancelling" if t.cancelling() else "pending",
                "awaits": await_chain(coro, waiter),
            }
        )
    return sorted(rows, key=lambda r: str(r["name"]))
