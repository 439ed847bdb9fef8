"""Schema of the `telemetry` and `uplink` sections (owned by the telemetry component)."""

from __future__ import annotations

from edgerund.config.base import Section


class TelemetryConfig(Section):
    enabled: bool = True


class UplinkConfig(Section):
    enabled: bool = False
