"""Schema of the `updates` section (owned by the updates component).

Everything that bounds an update lives here with its unit in the key name: how big a bundle
may be, how far a security counter may jump, how long the precheck subprocess may run, how
long the probation lasts and how many crashed trials are tolerated before a rollback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from edgerund.config.base import Section


class ProbationConfig(Section):
    """What the probation watches after a new model is swapped in (thresholds are deltas
    accumulated during the probation window)."""

    max_faults: int = 0  # model faults (exceptions) tolerated during probation
    max_nan_outputs: int = 0  # NaN/Inf outputs tolerated during probation
    max_missed_ticks: int = 0  # control-loop missed ticks tolerated during probation
    # ... plus missed_ratio x what the PREVIOUS model's miss rate (measured just before the
    # swap over a window as long as the probation, at most baseline_max_s) predicts.
    missed_ratio: float = 2.0
    # ... plus missed_z standard deviations of that prediction as a Poisson count (at least
    # missed_z ticks): the host's bursts are not the model's; 0 = no slack.
    missed_z: float = 3.0
    baseline_max_s: float = 10.0  # 0 = no baseline: max_missed_ticks alone
    # The new model must run at least this many inferences in its window when the previous
    # one ran any in the baseline (else the window is extended up to 3x, then rolled back:
    # probation_no_inferences); 0 = off.
    min_inferences: int = 1
    poll_interval_ms: int = 250  # how often models.stats()/loops.status() are sampled


class UpdatesConfig(Section):
    enabled: bool = False
    # Device keyring (JSON, see docs/updates.md). Relative paths are relative to
    # paths.state_dir. The keyring may be rotated at run time (`bundle keyring rotate`
    # produces the signed successor; the daemon stores the accepted one in state_dir).
    keyring_file: str = "keyring.json"
    bundle_max_mb: float = 64.0  # refused before a single byte is read when larger
    file_max_mb: float = 64.0  # each payload file inside a bundle
    manifest_max_kb: int = 256  # manifest.json (and manifest.sig) read into memory
    max_counter_jump: int = 16  # security counter may rise by at most this much per bundle
    max_version_jump: int = 0  # 0 = unlimited; else the major version may rise by at most this
    inbox_dir: str = ""  # watched directory (a technician's USB stick); "" = off
    inbox_poll_ms: int = 2000
    probation_s: float = 30.0  # default when the bundle's health criteria name none
    probation_max_s: float = 3600.0  # a bundle may not ask for a longer probation
    precheck_timeout_s: float = 60.0  # the subprocess is killed after this
    precheck_cpu_s: float = 0.0  # RLIMIT_CPU of the precheck child; 0 = precheck_timeout_s
    precheck_runs: int = 50  # timed runs (after warm-up) for the latency p95
    attempts: int = 2  # crashed trials (daemon died in TRIAL/PROBATION) before rollback
    max_state_writes: int = 64  # per deployment, like Mender's loop breaker
    # MQTT chunked transfer (cmd/update): resumable, size-capped.
    mqtt_enabled: bool = True
    mqtt_chunk_max_kb: int = 256
    mqtt_transfer_ttl_s: float = 3600.0  # a transfer with no chunk for this long is dropped
    mqtt_max_transfers: int = 2
    # Rate limit of the bundle sources (socket per uid, inbox, MQTT): a token bucket of
    # source_burst bundles refilled at source_per_min; over it, `rate_limited` before the
    # file is opened. source_per_min 0 = no limit.
    source_per_min: float = 6.0
    source_burst: int = 10
    counter_file: str = "updates/security_counter"  # used when identity is not a TPM
    # A model committed at most this long ago whose drift monitor calls drift against its
    # own reference profile, where the model it replaced had not, is rolled back to the
    # previous slot (reason post_update_drift; edgerund/updates/postdrift.py). 0 = off.
    post_update_drift_window_s: float = 86400.0
    probation: ProbationConfig = msgspec.field(default_factory=ProbationConfig)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _Updates(Protocol):
    """What `cross_check` reads of the root config (edgerund/config/schema.py)."""

    @property
    def updates(self) -> UpdatesConfig: ...
    @property
    def models(self) -> Sequence[_Named]: ...


def cross_check(cfg: _Updates) -> list[tuple[str, str]]:
    """Cross-field checks of the updates section against the rest of the config."""
    errors: list[tuple[str, str]] = []
    u = cfg.updates
    if not u.enabled:
        return errors
    if u.bundle_max_mb <= 0:
        errors.append(("updates.bundle_max_mb", f"expected > 0, got {u.bundle_max_mb}"))
    if u.file_max_mb <= 0:
        errors.append(("updates.file_max_mb", f"expected > 0, got {u.file_max_mb}"))
    if u.post_update_drift_window_s < 0:
        errors.append(
            (
                "updates.post_update_drift_window_s",
                f"expected >= 0 (0 = off), got {u.post_update_drift_window_s}",
            )
        )
    if u.max_counter_jump < 1:
        errors.append(("updates.max_counter_jump", f"expected >= 1, got {u.max_counter_jump}"))
    if u.max_version_jump < 0:
        errors.append(("updates.max_version_jump", f"expected >= 0, got {u.max_version_jump}"))
    if u.attempts < 1:
        errors.append(("updates.attempts", f"expected >= 1, got {u.attempts}"))
    if u.precheck_timeout_s <= 0:
        errors.append(("updates.precheck_timeout_s", f"expected > 0, got {u.precheck_timeout_s}"))
    if u.probation_s < 0 or u.probation_s > u.probation_max_s:
        errors.append(
            (
                "updates.probation_s",
                f"expected 0..{u.probation_max_s} (probation_max_s), got {u.probation_s}",
            )
        )
    if u.mqtt_chunk_max_kb < 1 or u.mqtt_chunk_max_kb > 16384:
        errors.append(
            ("updates.mqtt_chunk_max_kb", f"expected 1..16384, got {u.mqtt_chunk_max_kb}")
        )
    if u.probation.missed_ratio < 0:
        errors.append(
            ("updates.probation.missed_ratio", f"expected >= 0, got {u.probation.missed_ratio}")
        )
    if u.probation.baseline_max_s < 0:
        errors.append(
            (
                "updates.probation.baseline_max_s",
                f"expected >= 0, got {u.probation.baseline_max_s}",
            )
        )
    if u.source_per_min < 0:
        errors.append(("updates.source_per_min", f"expected >= 0, got {u.source_per_min}"))
    if u.source_burst < 1:
        errors.append(("updates.source_burst", f"expected >= 1, got {u.source_burst}"))
    if u.max_state_writes < 16:
        errors.append(("updates.max_state_writes", f"expected >= 16, got {u.max_state_writes}"))
    if not cfg.models:
        errors.append(
            ("updates.enabled", "expected at least one entry in models[] to update, got none")
        )
    for i, mc in enumerate(cfg.models):
        # The name becomes a directory under state_dir/models/ (uniqueness is checked by
        # the models section).
        if not mc.name or "/" in mc.name or mc.name.startswith("."):
            errors.append(
                (f"models[{i}].name", f"expected a plain directory name, got {mc.name!r}")
            )
    return errors
