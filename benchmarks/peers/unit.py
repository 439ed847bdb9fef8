"""The process settings of the shipped systemd unit (systemd/edgerund.service) that a
benchmark reproduces when it starts the daemon itself: `Environment=` assignments and
`Nice=`. Read from the unit file, so a benchmark follows the unit when it changes."""

from __future__ import annotations

from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "edgerund.service"


def _values(key: str) -> list[str]:
    prefix = key + "="
    return [
        line.split("=", 1)[1].strip()
        for line in UNIT.read_text().splitlines()
        if line.startswith(prefix)
    ]


def environment() -> dict[str, str]:
    """The `Environment=` assignments of the unit (KEY=VALUE, space-separated)."""
    env: dict[str, str] = {}
    for value in _values("Environment"):
        for item in value.split():
            k, _, v = item.strip('"').partition("=")
            env[k] = v
    return env


def nice() -> int:
    """The unit's `Nice=` (0 when it sets none)."""
    vals = _values("Nice")
    return int(vals[-1]) if vals else 0


def nice_prefix(level: int) -> list[str]:
    """argv prefix running a command at `level` (empty for 0): what `Nice=` does."""
    return ["nice", "-n", str(level)] if level else []
