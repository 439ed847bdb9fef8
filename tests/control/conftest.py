"""The in-process loop tests build components themselves, so they stand in for the
composition root: the emulated actuator they write to is a simulation-only driver, which
only the root registers (drivers/registry.py)."""

from __future__ import annotations

import pytest

from drivers.emulated import register_drivers


@pytest.fixture(autouse=True, scope="session")
def _emulated_drivers() -> None:
    register_drivers()
