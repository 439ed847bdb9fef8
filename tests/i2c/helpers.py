"""Helpers for the I2C tests (imported by the test modules)."""

from __future__ import annotations

from typing import Any

import msgspec


class FakeClock:
    """A clock tests advance by hand, so emulator timing checks are exact and not flaky."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def cfg(type_: type[Any], **kw: Any) -> Any:
    """Build a driver config the way the loader does (msgspec.convert, tag included)."""
    tag = type_.__struct_config__.tag
    base = {"id": "s1"} if "id" in type_.__struct_fields__ else {}  # sensors have ids
    return msgspec.convert({**base, "driver": tag, **kw}, type_)


def values(readings: Any) -> dict[str, float]:
    return {r.channel: r.value for r in readings}
