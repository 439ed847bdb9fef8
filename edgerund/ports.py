"""The typed contracts between the daemon's components (ports, in ports-and-adapters terms).

The composition root (edgerund/daemon.py) builds each component with exactly the ports it
needs, as constructor arguments; a component never looks a peer up by name, never polls for
a peer built after it and never tests a peer with `hasattr`. Each port is the narrowest view
one component needs of another, so a test hands a component a small fake that implements
the port instead of a whole peer.

Who provides what (see docs/architecture.md for the graph):

    port            provided by                      used by
    SampleSource    hub (SensorHub)                  loops, telemetry
    LoopSamples     hub (a part of SampleSource)     each ControlLoop
    ModelHost       models (ModelsComponent)         loops, updates
    Calibrator      models (ModelsComponent)         updates (device calibrations, adapt)
    SlotSource      updates' slot repository         models
    Measurer        identity                         models (PCR binding after a swap)
    Signer          identity                         telemetry (batch signatures)
    Counter         identity (TPM NV) or a file      updates (anti-rollback)
    IdentityPort    identity (IdentityComponent)     the root (counter_for), diag commands
    LoopStats       loops (LoopsComponent)           updates (probation)
    DriftReports    models (ModelsComponent)         updates (post-update drift rollback)
    CommandRouter   the root's RemoteCommands        updates registers; telemetry dispatches
    CommandGate     the twin's command gate          RemoteCommands (operator signatures)
    ModelPins       the twin's pins (twin/pins.py)   updates (local updates vs model targets)
    EventSink       the root's EventBus              every component publishes

No `Any` crosses these boundaries: records are frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from drivers.base import Sample
    from edgerund.context import Event
    from edgerund.inference.adapt import FittedCalibration
    from edgerund.inference.runner import ModelRunner

    F64 = npt.NDArray[np.float64]


# ---------------------------------------------------------------- samples


class LoopSamples(Protocol):
    """What a control loop needs of the hub: windows, states and fresh reads."""

    def state(self, sensor_id: str) -> str:
        """ "ok", "stale", "failed", ... (drivers/base.py SensorState values)."""
        ...

    def window(self, sensor_id: str, channel: str, n: int) -> tuple[F64, F64]:
        """The newest `n` (t_mono, value) of one channel, oldest first."""
        ...

    def lock_phase(self, sensor_id: str, period_s: float, t0_s: float) -> bool:
        """Put a polled sensor's reads on the deadline grid `t0_s + k * period_s`
        (time.monotonic), each deadline's read made when the loop asks for it
        (`request_read`); False when the sensor cannot (a stream)."""
        ...

    def request_read(self, sensor_id: str) -> Awaitable[bool] | None:
        """A locked sensor that is "ok": read now; the future turns True once a read
        started after the call is stored (the hub's is an asyncio future). None:
        nothing to wait for."""
        ...


class SampleSource(LoopSamples, Protocol):
    """The newest samples of every configured sensor (the hub)."""

    def channels(self) -> list[tuple[str, str, str]]:
        """(sensor_id, channel, unit) of every channel, in config order."""
        ...

    def latest(self, sensor_id: str, channel: str) -> Sample | None: ...

    def subscribe(self, fn: Callable[[Sample], None]) -> Callable[[], None]:
        """Call `fn` on the event loop for every sample; returns the unsubscribe call."""
        ...


# ---------------------------------------------------------------- models


@dataclass(frozen=True, slots=True)
class ModelCounters:
    """Monotonic counters of one model's runner since start (probation takes deltas)."""

    inferences: int
    faults: int
    nan_outputs: int
    score_mean: float | None  # mean anomaly score of the recent window, None before any
    # Of `faults`, those of the INPUT (a stalled sensor's timestamp gap, a NaN reading): the
    # same for any model fed that stream, so probation judges them against the old model's.
    input_faults: int = 0
    # The drift monitor of THIS runner (edgerund.inference.driftwatch); drift_state None:
    # no monitor (yet) for this runner. Block counts are monotonic from the swap.
    drift_state: str | None = None  # ok | anomaly | sensor_fault | drift
    drift_since: float | None = None  # wall time the state began
    drift_blocks: int = 0
    drift_anomaly_blocks: int = 0
    drift_fault_blocks: int = 0


class ModelHost(Protocol):
    """The running models (the models component)."""

    def runner(self, name: str) -> ModelRunner | None:
        """The runner serving `name` now; looked up on every tick, so a swap is atomic."""
        ...

    async def swap(self, name: str, model_dir: Path) -> None:
        """Load, check and warm up off the loop, then replace; ModelError keeps the old."""
        ...

    def counters(self, name: str) -> ModelCounters: ...


class Calibrator(Protocol):
    """Fits device calibrations of the running models (the models component)."""

    async def fit_calibration(
        self, name: str, *, forced_shift_sd: float | None = None
    ) -> FittedCalibration:
        """Fit on the drift task's recent blocks off the loop at low priority, checked
        against the signed policy and the must-detect vectors; CalibrationRefused says
        why not. `forced_shift_sd`: not fitted, every vibration band shifted by this much
        (test hooks only, docs/learning.md)."""
        ...


@dataclass(frozen=True, slots=True)
class DriftStatus:
    """The drift monitor's verdict on the model running now, and the last verdict on the
    model it replaced (edgerund.inference.driftwatch)."""

    version: str
    state: str  # ok | anomaly | sensor_fault | drift | no_profile
    reason: str
    blocks: int
    previous_version: str | None = None
    previous_state: str | None = None
    previous_blocks: int = 0


class DriftReports(Protocol):
    def drift_status(self, name: str) -> DriftStatus | None:
        """None when `name` has no drift monitor."""
        ...


@dataclass(frozen=True, slots=True)
class SlotProblem:
    """Why a slot is not used: a failed update or a slot quarantined at start-up."""

    reason: str  # stable code, e.g. "probation_faults", "slot_file_hash"
    message: str
    at: float  # wall time


@dataclass(frozen=True, slots=True)
class SlotRecord:
    """What the slot store says about one managed model."""

    name: str
    active_slot: str | None  # "a" | "b" | None (no slot installed: the packaged model runs)
    version: str | None
    state: str  # the update state machine's state, e.g. "COMMITTED", "PROBATION"
    model_dir: Path | None  # the active slot's directory, verified at start-up
    last_failure: SlotProblem | None = None
    quarantined: Mapping[str, SlotProblem] = field(default_factory=dict)  # by slot


class SlotSource(Protocol):
    """The verified A/B slots (the updates component's slot repository)."""

    def active(self, name: str) -> SlotRecord | None:
        """None when updates do not manage `name`."""
        ...


# ---------------------------------------------------------------- identity


class Measurer(Protocol):
    """Binds what runs into the attestation (a PCR or NV extend)."""

    async def bind_model(
        self,
        manifest_sha256: bytes,
        name: str,
        *,
        overlay_sha256: bytes | None = None,
        overlay_version: str | None = None,
    ) -> None:
        """Measure the model's signed manifest and, when it runs a device calibration
        (`X+cal.N`), the digest of its overlay document; None: uncalibrated."""
        ...


class Signer(Protocol):
    """The gateway's signing key (TPM-resident or software)."""

    @property
    def kind(self) -> str:
        """ "tpm" | "software"."""
        ...

    @property
    def key_id(self) -> str: ...

    def public_key_pem(self) -> str: ...

    async def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA signature over a SHA-256 digest."""
        ...


class Counter(Protocol):
    """A monotonic counter against rollback (TPM NV counter or a file)."""

    @property
    def kind(self) -> str: ...

    async def read(self) -> int: ...

    async def ratchet(self, value: int) -> int:
        """Raise the counter to at least `value`; returns the new value."""
        ...


class IdentityPort(Signer, Measurer, Protocol):
    """The whole public surface of the identity component (TPM-backed or software)."""

    @property
    def insecure(self) -> bool:
        """True for the software identity standing in for an absent TPM."""
        ...

    async def counter_read(self) -> int: ...

    async def counter_increment(self) -> int: ...

    async def attest(self, nonce: bytes) -> dict[str, object]:
        """A quote over the binding PCRs for a verifier's nonce (DESIGN.md "Attestation")."""
        ...


# ---------------------------------------------------------------- loops


@dataclass(frozen=True, slots=True)
class LoopCounters:
    """Monotonic tick counters summed over the control loops (probation takes deltas)."""

    ticks: int
    missed: int
    overruns: int
    fallback_ticks: int = 0  # ticks decided by the fallback rules (no usable model)


class LoopStats(Protocol):
    def counters(self) -> LoopCounters: ...


# ---------------------------------------------------------------- remote commands, events

RemoteHandler = Callable[[bytes], Awaitable[bytes | None]]
"""Handles one remote (MQTT `cmd/{name}`) request payload; returns the reply payload."""


class CommandRouter(Protocol):
    def register(self, name: str, handler: RemoteHandler) -> None:
        """Serve `cmd/{name}`; a name registered twice is a programming error."""
        ...


@dataclass(frozen=True, slots=True)
class Admitted:
    """A remote request the gate let through: what the handler sees, and who signed it."""

    payload: bytes  # the request as the handler reads it (a signed command's args as JSON)
    nonce: str | None = None  # None: a command exempt from signatures (docs/twin.md)
    keyid: str | None = None  # the operator key that signed it


class CommandGate(Protocol):
    """Authenticates remote requests and signs replies (edgerund/twin/gate.py)."""

    def admit(self, name: str, payload: bytes) -> Admitted:
        """The request to run, or CommandError with the refusal reason."""
        ...

    async def seal(self, name: str, admitted: Admitted, reply: bytes) -> bytes:
        """The reply as the requester receives it (signed by the gateway when signed)."""
        ...


# The refusal of a local update of a model a twin target pins to another version: a
# refusal of the moment (the backend may lift the pin), not of the bundle.
PINNED_BY_TWIN = "pinned_by_twin"


class ModelPins(Protocol):
    """The twin's model targets as local updates see them (edgerund/twin/pins.py)."""

    @property
    def version(self) -> int:
        """The desired version the pins come from: it changes when the targets may have."""
        ...

    def check_local_update(
        self, model: str, version: str | None, *, source: str, override: bool
    ) -> None:
        """TrustError `pinned_by_twin` when a target pins `model` to another version and
        `override` is not given; an override is recorded (and reported upstream)."""
        ...

    def check_target_job(self, model: str, active_version: object) -> None:
        """TrustError when the twin's own target job would undo an override made under
        the same desired version (the target was in flight when it was made)."""
        ...


class EventSink(Protocol):
    def publish(self, kind: str, source: str, **fields: object) -> Event: ...
