"""Schema of the `telemetry` and `uplink` sections (owned by the telemetry component).

`telemetry` says what is sent and how it is kept (classes, batching, scales, rings, the
spool's cap and time-to-live per class); `uplink` says where it goes (the MQTT 5 broker,
TLS files, session, pacing of replay, reconnect backoff). `cross_check` holds the checks
that span keys or sections; the loader adds FILE:LINE to what it returns.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

from edgerund.config.base import Section
from edgerund.tlsfiles import TlsFileError, client_context, file_problem

if TYPE_CHECKING:
    import ssl


class SeriesConfig(Section):
    """How the channels matching `match` (glob on `sensor_id.channel`) are sent.

    The first matching entry wins; channels matching none use the telemetry defaults.
    """

    match: str
    # Values travel as integers v * 10**-scale_exp: -2 sends 0.01 steps. Give either
    # scale_exp or resolution (a power of ten, e.g. 0.001), not both.
    scale_exp: int | None = None
    resolution: float | None = None
    raw: bool = False  # send every sample (class raw) in addition to aggregates
    agg: bool = True  # send min/max/mean/last/count every agg_interval_s
    vibration: bool = False  # aggregates add rms, peak, crest factor, band energies
    ring_samples: int | None = None  # local raw ring kept for `upload_raw` and event windows
    period_ms: int | None = None  # nominal period; None: detected from the timestamps

    def effective_scale_exp(self, default: int) -> int:
        if self.scale_exp is not None:
            return self.scale_exp
        if self.resolution is not None and self.resolution > 0:
            return round(math.log10(self.resolution))
        return default


class TtlConfig(Section):
    """Time-to-live per class of data in the spool (unsent rows older are dropped with a
    loss record)."""

    evt_h: float = 24.0 * 30
    agg_h: float = 24.0 * 14
    raw_h: float = 24.0 * 3


class TelemetryConfig(Section):
    enabled: bool = True
    spool_dir: str | None = None  # default: <paths.state_dir>/telemetry
    spool_max_mb: float = 256.0  # the spool's files (db + WAL) never grow past this
    ttl: TtlConfig = msgspec.field(default_factory=TtlConfig)
    keep_acked_h: float = 24.0  # delivered batches kept for `cmd/resend` while space allows
    commit_interval_ms: int = 1000  # grouped commits; events commit at once
    batch_max_age_s: float = 60.0  # a raw batch is sealed at this age: the kill -9 loss bound
    batch_max_samples: int = 6000  # ... or at this many samples
    agg_interval_s: float = 60.0
    default_scale_exp: int = -3
    default_ring_samples: int = 256  # every series keeps this many for event windows
    event_window_s: float = 2.0  # raw window sent before and after an anomaly
    vibration_bands_hz: list[tuple[float, float]] = msgspec.field(
        default_factory=lambda: [(0.0, 10.0), (10.0, 30.0), (30.0, 50.0)]
    )
    series: list[SeriesConfig] = msgspec.field(default_factory=list)
    events: list[str] = msgspec.field(
        default_factory=lambda: [
            "anomaly.*",
            "sensor.state",
            "update.*",
            "loop.fallback",
            "drift.*",
        ]
    )

    def series_for(self, sensor_id: str, channel: str) -> SeriesConfig:
        name = f"{sensor_id}.{channel}"
        for s in self.series:
            if fnmatch.fnmatchcase(name, s.match):
                return s
        return SeriesConfig(match=name)


class TlsConfig(Section):
    ca_file: str
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    # SNI / certificate host name: not used yet (a warning at start); the certificate is
    # checked against `host`
    server_name: str | None = None


class UplinkConfig(Section):
    enabled: bool = False
    host: str = "localhost"
    port: int = 1883
    tls: TlsConfig | None = None
    username: str | None = None
    password_file: str | None = None
    client_id: str | None = None  # default: edgerund-<gateway.id>
    topic_prefix: str = "tlm/v1"
    keepalive_s: int = 60
    session_expiry_s: int = 3600
    connect_timeout_s: float = 15.0
    ack_timeout_s: float = 60.0  # no PUBACK in this time: the link is dead, reconnect
    inflight_max: int = 8  # unacknowledged QoS 1 publishes at once
    replay_bytes_per_s: int = 16384  # token bucket over every batch sent (the link's share)
    replay_burst_bytes: int = 65536
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    cmd_max_bytes: int = 1048576  # larger cmd messages are rejected
    message_expiry_raw_s: int | None = None  # MQTT 5 Message Expiry on raw batches
    protocol: Literal["mqtt5"] = "mqtt5"
    # signing failed (TPM busy/hung): false = hold batches in the spool and retry; true =
    # publish unsigned (counted in status as unsigned_batches)
    allow_unsigned: bool = False
    sign_retry_s: float = 5.0  # wait after a signing failure before retrying held batches
    # PUBACK 0x10 (no matching subscribers) on a batch: the broker delivered it to nobody.
    # true = keep the row undelivered, pause (no_subscriber_retry_s, doubling up to
    # no_subscriber_retry_max_s) and send it again; false = count it delivered (MQTT's view)
    require_subscriber: bool = True
    no_subscriber_retry_s: float = 1.0
    no_subscriber_retry_max_s: float = 30.0


_CLASSES = ("evt", "agg", "raw")


class _Gateway(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def site(self) -> str: ...


class _Sensor(Protocol):
    @property
    def id(self) -> str: ...


class _Telemetry(Protocol):
    """What `cross_check` reads of the root config (edgerund/config/schema.py)."""

    @property
    def telemetry(self) -> TelemetryConfig: ...
    @property
    def uplink(self) -> UplinkConfig: ...
    @property
    def gateway(self) -> _Gateway: ...
    @property
    def sensors(self) -> Sequence[_Sensor]: ...


def broker_credentials(u: UplinkConfig) -> tuple[str | None, ssl.SSLContext | None]:
    """The broker password and TLS context of the uplink's (and the twin's) MQTT sessions
    (blocking: reads files). The context is ours, not paho's `tls_set`: an encrypted key
    fails with its file named instead of stopping at OpenSSL's passphrase prompt
    (edgerund/tlsfiles.py)."""
    password = Path(u.password_file).read_text().strip() if u.password_file else None
    tls = None
    if u.tls is not None:
        tls = client_context(u.tls.ca_file, u.tls.cert_file, u.tls.key_file)
    return password, tls


def _tls_files(tls: TlsConfig) -> list[tuple[str, str]]:
    """The uplink's TLS files exist and load as what they claim to be (a key that is not
    the certificate's, or an encrypted one, is a config error with its line, not a
    connection that fails at every attempt)."""
    errs = []
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        if path is not None and (why := file_problem(path, absolute=False)) is not None:
            errs.append((f"uplink.tls.{key}", why))
    if not errs:
        try:
            client_context(tls.ca_file, tls.cert_file, tls.key_file)
        except TlsFileError as exc:
            errs.append((f"uplink.tls.{'ca_file' if exc.role == 'ca' else 'key_file'}", str(exc)))
    return errs


def cross_check(cfg: _Telemetry) -> list[tuple[str, str]]:
    """Checks across keys: returns (key.path, message) pairs, empty when fine."""
    errs: list[tuple[str, str]] = []
    t = cfg.telemetry
    u = cfg.uplink
    if t.spool_max_mb < 0.25:
        errs.append(("telemetry.spool_max_mb", f"expected >= 0.25, got {t.spool_max_mb}"))
    for cls in _CLASSES:
        v = getattr(t.ttl, f"{cls}_h")
        if not v > 0:
            errs.append((f"telemetry.ttl.{cls}_h", f"expected > 0 hours, got {v}"))
    if not 0 < t.batch_max_age_s <= 3600:
        errs.append(
            ("telemetry.batch_max_age_s", f"expected 0 < s <= 3600, got {t.batch_max_age_s}")
        )
    if not 0 < t.agg_interval_s <= 86400:
        errs.append(
            ("telemetry.agg_interval_s", f"expected 0 < s <= 86400, got {t.agg_interval_s}")
        )
    if t.batch_max_samples < 1:
        errs.append(("telemetry.batch_max_samples", f"expected >= 1, got {t.batch_max_samples}"))
    if t.commit_interval_ms < 0:
        errs.append(("telemetry.commit_interval_ms", f"expected >= 0, got {t.commit_interval_ms}"))
    if not -12 <= t.default_scale_exp <= 12:
        errs.append(("telemetry.default_scale_exp", f"expected -12..12, got {t.default_scale_exp}"))
    for i, (lo, hi) in enumerate(t.vibration_bands_hz):
        if not 0 <= lo < hi:
            errs.append(
                (
                    f"telemetry.vibration_bands_hz[{i}]",
                    f"expected 0 <= low < high, got [{lo}, {hi}]",
                )
            )
    sensor_ids = [s.id for s in cfg.sensors]
    for i, s in enumerate(t.series):
        where = f"telemetry.series[{i}]"
        if s.scale_exp is not None and s.resolution is not None:
            errs.append((f"{where}.resolution", "give scale_exp or resolution, not both"))
        if s.scale_exp is not None and not -12 <= s.scale_exp <= 12:
            errs.append((f"{where}.scale_exp", f"expected -12..12, got {s.scale_exp}"))
        if s.resolution is not None:
            exp = math.log10(s.resolution) if s.resolution > 0 else float("nan")
            if not (math.isfinite(exp) and abs(exp - round(exp)) < 1e-9 and -12 <= exp <= 12):
                errs.append(
                    (
                        f"{where}.resolution",
                        f"expected a power of ten (0.01, 1, 10), got {s.resolution}",
                    )
                )
        if s.ring_samples is not None and not 0 <= s.ring_samples <= 50_000_000:
            errs.append((f"{where}.ring_samples", f"expected 0..50000000, got {s.ring_samples}"))
        if s.period_ms is not None and s.period_ms <= 0:
            errs.append((f"{where}.period_ms", f"expected > 0, got {s.period_ms}"))
        sensor_pat = s.match.split(".", 1)[0]
        if sensor_ids and not any(fnmatch.fnmatchcase(sid, sensor_pat) for sid in sensor_ids):
            errs.append(
                (
                    f"{where}.match",
                    f"matches no configured sensor (expected one of {sensor_ids}, got {s.match!r})",
                )
            )
    if u.enabled and not t.enabled:
        errs.append(
            (
                "uplink.enabled",
                "the uplink sends the telemetry spool: expected telemetry.enabled true",
            )
        )
    if not 0 < u.port < 65536:
        errs.append(("uplink.port", f"expected 1..65535, got {u.port}"))
    if u.inflight_max < 1 or u.inflight_max > 65535:
        errs.append(("uplink.inflight_max", f"expected 1..65535, got {u.inflight_max}"))
    if u.replay_bytes_per_s < 256:
        errs.append(("uplink.replay_bytes_per_s", f"expected >= 256, got {u.replay_bytes_per_s}"))
    if u.replay_burst_bytes < 1024:
        errs.append(("uplink.replay_burst_bytes", f"expected >= 1024, got {u.replay_burst_bytes}"))
    if not 0 < u.backoff_initial_s <= u.backoff_max_s:
        errs.append(
            (
                "uplink.backoff_initial_s",
                f"expected 0 < initial <= backoff_max_s ({u.backoff_max_s}), got {u.backoff_initial_s}",
            )
        )
    if not 0 < u.no_subscriber_retry_s <= u.no_subscriber_retry_max_s:
        errs.append(
            (
                "uplink.no_subscriber_retry_s",
                "expected 0 < s <= no_subscriber_retry_max_s "
                f"({u.no_subscriber_retry_max_s}), got {u.no_subscriber_retry_s}",
            )
        )
    if u.keepalive_s < 5:
        errs.append(("uplink.keepalive_s", f"expected >= 5, got {u.keepalive_s}"))
    if u.session_expiry_s < 0:
        errs.append(("uplink.session_expiry_s", f"expected >= 0, got {u.session_expiry_s}"))
    if u.tls is not None and (u.tls.cert_file is None) != (u.tls.key_file is None):
        errs.append(("uplink.tls.key_file", "cert_file and key_file go together (mutual TLS)"))
    elif u.tls is not None and u.enabled:
        errs += _tls_files(u.tls)
    if u.password_file is not None and u.username is None:
        errs.append(("uplink.username", "password_file is set but username is not"))
    if "#" in u.topic_prefix or "+" in u.topic_prefix or u.topic_prefix.endswith("/"):
        errs.append(
            (
                "uplink.topic_prefix",
                f"expected a plain topic without wildcards or trailing '/', got {u.topic_prefix!r}",
            )
        )
    for key in ("site", "id"):
        v = getattr(cfg.gateway, key)
        if any(c in v for c in "/#+") or not v:
            errs.append(
                (f"gateway.{key}", f"used in MQTT topics: expected no '/', '#', '+', got {v!r}")
            )
    return errs
