"""The foundation's own sections (gateway, paths, logging, diag, daemon, metrics) and
their cross-field checks.

Like every section module, this one never imports the root schema: `cross_check` states
the part of the config it reads as a Protocol (`_Foundation`), which the root `Config`
satisfies structurally, and edgerund/config/schema.py lists it in its table of checks.
"""

from __future__ import annotations

import re
from typing import Literal, Protocol

from edgerund.config.base import Section

_TOPIC_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class GatewayConfig(Section):
    id: str
    site: str = "default"
    hardware_id: str = "generic"  # matched against bundle compatibility
    # Free-form labels reported in the twin, for fleet selection (`labels.K=V`).
    labels: dict[str, str] = {}


class PathsConfig(Section):
    state_dir: str = "/var/lib/edgerund"
    run_dir: str = "/run/edgerund"


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, else JSON
    ring_size: int = 2000  # recent events kept in memory for `edgerunctl log`


class DiagConfig(Section):
    enabled: bool = True
    socket: str = "/run/edgerund/diag.sock"
    mode: int = 0o660
    group: str = "edgerund"  # members (and root) may run mutating commands
    max_request_bytes: int = 65536
    idle_timeout_s: float = 300.0
    max_clients: int = 64


class DaemonConfig(Section):
    watchdog_lag_limit_ms: float = 500.0  # WATCHDOG=1 is withheld while loop lag exceeds this
    loop_lag_interval_ms: int = 100  # how often the loop-lag monitor samples
    shutdown_timeout_s: float = 10.0
    use_uvloop: bool = True


class MetricsConfig(Section):
    # Write Prometheus text to this file every interval_s for node_exporter's textfile
    # collector (e.g. /var/lib/prometheus/node-exporter/edgerund.prom); empty: off.
    textfile: str = ""
    interval_s: float = 15.0


class _Foundation(Protocol):
    """What `cross_check` reads of the root config."""

    @property
    def gateway(self) -> GatewayConfig: ...
    @property
    def paths(self) -> PathsConfig: ...
    @property
    def diag(self) -> DiagConfig: ...
    @property
    def daemon(self) -> DaemonConfig: ...


def cross_check(cfg: _Foundation) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in (("gateway.id", cfg.gateway.id), ("gateway.site", cfg.gateway.site)):
        if not _TOPIC_SAFE.match(value):
            out.append(
                (
                    key,
                    f"expected 1-64 letters, digits, '.', '_' or '-' (it is used in "
                    f"MQTT topics), got {value!r}",
                )
            )
    if not 0 <= cfg.diag.mode <= 0o777:
        out.append(("diag.mode", f"expected a file mode like 0o660, got {cfg.diag.mode!r}"))
    if cfg.diag.max_request_bytes < 1024:
        out.append(
            ("diag.max_request_bytes", f"expected at least 1024, got {cfg.diag.max_request_bytes}")
        )
    if cfg.daemon.watchdog_lag_limit_ms <= 0:
        out.append(
            (
                "daemon.watchdog_lag_limit_ms",
                f"expected a positive number, got {cfg.daemon.watchdog_lag_limit_ms}",
            )
        )
    if not 10 <= cfg.daemon.loop_lag_interval_ms <= 10_000:
        out.append(
            (
                "daemon.loop_lag_interval_ms",
                f"expected 10..10000, got {cfg.daemon.loop_lag_interval_ms}",
            )
        )
    for key, value in (
        ("paths.state_dir", cfg.paths.state_dir),
        ("paths.run_dir", cfg.paths.run_dir),
        ("diag.socket", cfg.diag.socket),
    ):
        if not value.startswith("/"):
            out.append((key, f"expected an absolute path, got {value!r}"))
    return out
