"""Register-level device emulators, the simulated plant, and the simulation-only drivers.

Nothing in production code imports this package (tests/test_architecture.py reads the
imports). The composition root loads it only after choosing simulated resources, and
then calls `register_drivers()` so the simulation-only drivers (the emulated actuator)
can be built from a config that names them.
"""

from __future__ import annotations


def register_drivers() -> None:
    """Add the simulation-only drivers' factories to drivers.registry (idempotent)."""
    from drivers.emulated.actuator import ACTUATOR
    from drivers.registry import register_actuator

    register_actuator(ACTUATOR)
