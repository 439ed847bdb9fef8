"""Cross-field checks of the foundation's own sections (gateway, paths, diag, daemon)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgerund.config.schema import Config

_TOPIC_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def cross_check(cfg: Config) -> list[tuple[str, str]]:
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
