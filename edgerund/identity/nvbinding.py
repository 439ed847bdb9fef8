"""The NV binding: what the daemon extends into its NV extend index, and how to replay it.

Pure (no TPM, no I/O): imported by the device (identity/tpm.py) and by verifiers
(backend/binding_verify.py), so both compute the same bytes.

The daemon owns an NV index of type TPM_NT_EXTEND (sha256, 32 bytes) that only it can write
(docs/identity.md "NV binding"). Whenever the running configuration or a model changes
(start-up, SIGHUP reload, model swap) it extends the index with one *binding event*:

    event = sha256("edgerund-binding-v1\\0" || config_sha256 || for each model, by name:
                   sha256(utf8 name) || manifest_sha256)

when no model runs a device calibration (so every event made before calibrations were
attested replays unchanged), and when at least one does:

    event = sha256("edgerund-binding-v2\\0" || config_sha256 || for each model, by name:
                   sha256(utf8 name) || manifest_sha256 || overlay_sha256 || sha256(utf8 version))

with overlay_sha256 = sha256(calibration.json bytes) and version its `X+cal.N`; an
uncalibrated model of a v2 event has 32 zero bytes in place of each of the last two (no
document hashes to zero). Every field is 32 bytes, so the preimage parses one way only.

An extend index is never reset without undefining it, so the event log the daemon keeps
starts from the value it found at start-up (`initial`) and lists the events since; replaying
it must give the value the TPM certified (TPM2_NV_Certify with the AK). The LAST event is the
binding in force when the certification was made; since nobody else can extend the index,
H(prev || event) == certified value proves the daemon itself extended that event last.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from edgerund.identity import tpmstruct as ts
from edgerund.identity.binding import ModelBinding, parse_model_entry

DOMAIN = b"edgerund-binding-v1\x00"
DOMAIN_V2 = b"edgerund-binding-v2\x00"  # events with a calibrated model
_NONE = bytes(32)
GENESIS = hashlib.sha256(b"edgerund-binding-index-defined").digest()  # first extend
ST_ATTEST_NV = 0x8014


def event_digest(config_sha256: bytes, models: Mapping[str, bytes]) -> bytes:
    """The binding event for a config digest and {model name: manifest sha256}."""
    if len(config_sha256) != 32:
        raise ValueError("config digest must be 32 bytes")
    h = hashlib.sha256(DOMAIN + config_sha256)
    for name in sorted(models):
        digest = models[name]
        if len(digest) != 32:
            raise ValueError(f"manifest digest of model {name!r} must be 32 bytes")
        h.update(hashlib.sha256(name.encode()).digest() + digest)
    return h.digest()


def binding_event(config_sha256: bytes, models: Sequence[ModelBinding]) -> bytes:
    """The binding event for a config and the models' entries: v1 (`event_digest`) while
    no model runs a calibration, v2 (module docstring) as soon as one does."""
    if all(m.overlay_sha256 is None for m in models):
        return event_digest(config_sha256, {m.name: m.manifest_sha256 for m in models})
    if len(config_sha256) != 32:
        raise ValueError("config digest must be 32 bytes")
    h = hashlib.sha256(DOMAIN_V2 + config_sha256)
    for m in sorted(models, key=lambda m: m.name):
        if m.overlay_sha256 is None:
            tail = _NONE + _NONE
        else:
            version = hashlib.sha256((m.overlay_version or "").encode()).digest()
            tail = m.overlay_sha256 + version
        h.update(hashlib.sha256(m.name.encode()).digest() + m.manifest_sha256 + tail)
    return h.digest()


def replay(initial: bytes, events: Iterable[bytes]) -> bytes:
    value = initial
    for e in events:
        value = ts.extend(value, e)
    return value


@dataclass(frozen=True)
class NvCertifyInfo:
    """TPMS_NV_CERTIFY_INFO inside a TPMS_ATTEST of type TPM_ST_ATTEST_NV."""

    index_name: bytes
    offset: int
    contents: bytes


def parse_nv_certify(attest: bytes) -> tuple[ts.Attest, NvCertifyInfo]:
    """Split a TPMS_ATTEST (type 0x8014) into its header and its NV certify info.

    tpmstruct.parse_attest covers the header; the attested union for NV is read here.
    """
    r = ts.Reader(attest, "TPMS_ATTEST")
    head = ts.read_attest_header(r)
    if head.type != ST_ATTEST_NV:
        raise ValueError(f"expected TPM_ST_ATTEST_NV (0x{ST_ATTEST_NV:04x}), got 0x{head.type:04x}")
    name = r.b2("indexName")
    offset = r.u16("offset")
    contents = r.b2("nvContents")
    r.done()
    return head, NvCertifyInfo(name, offset, contents)


def log_events(log: Mapping[str, object]) -> tuple[bytes, list[bytes], Sequence[object]]:
    """(initial, event digests, raw event records) of an attestation's `nv_binding.log`."""
    initial = bytes.fromhex(str(log["initial"]))
    raw = log["events"]
    if not isinstance(raw, list):
        raise ValueError("nv_binding.log.events must be a list")
    digests: list[bytes] = []
    for ev in raw:
        if not isinstance(ev, Mapping):
            raise ValueError("each nv_binding.log event must be an object")
        models = ev.get("models") or []
        if not isinstance(models, list):
            raise ValueError("event models must be a list")
        digests.append(
            binding_event(
                bytes.fromhex(str(ev["config_sha256"])), [parse_model_entry(m) for m in models]
            )
        )
    return initial, digests, raw
