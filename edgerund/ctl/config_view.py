"""`edgerunctl config`: the effective config, one key per line, with where it came from
(`file`, or `twin vN` for keys an applied desired state set). Lists of loops, sensors and
models are shown keyed by their id, as the twin addresses them (docs/twin.md)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from edgerund.twin.desired import to_view


def lines(result: dict[str, Any]) -> list[str]:
    view = to_view(result.get("config") or {})
    origin: dict[str, str] = result.get("origin") or {}
    out: list[str] = []

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, [*path, str(k)])
            return
        key = ".".join(path)
        src = next(
            (
                origin[p]
                for p in sorted(origin, key=len, reverse=True)
                if (key + ".").startswith(p + ".")
            ),
            "file",
        )
        out.append(f"{key} = {json.dumps(node, default=str)}  [{src}]")

    walk(view, [])
    desired = result.get("desired") or {}
    if desired.get("outcome"):
        out.append(
            f"# last desired state: v{desired.get('version')} {desired.get('outcome')}"
            + (
                f" ({desired.get('reason')}: {desired.get('message')})"
                if desired.get("reason")
                else ""
            )
        )
    return out


def render_config(console: Console, result: dict[str, Any]) -> None:
    for line in lines(result):
        console.print(line, markup=False, highlight=False)
