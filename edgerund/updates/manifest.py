"""Bundle manifest: schema, strict JSON parsing and the signed canonical form (pure, no I/O).

Theory of operation
-------------------
A signature covers *meaning*, not bytes: the signed message is a domain tag followed by the
canonical JSON of the parsed manifest (keys sorted, no insignificant whitespace, UTF-8,
floats in Python's shortest round-trip form). Re-serialising before checking means that
whitespace or key order in `manifest.json` cannot matter, and the domain tag
(`edgerund-manifest-v1\\0`, `edgerund-keyring-v1\\0`) means a signature made for one kind of
document can never be replayed as another. Duplicate keys are refused at parse time:
two parsers that disagree on which duplicate wins are a classic signature bypass.

The manifest lists every payload file with its size and SHA-256, so one signature covers
all files together (no mix-and-match of files from two bundles, unlike per-file signing).

Names: `BundleManifest` is the signed *bundle* manifest (what to install and whether to
trust it: bundle id, counter, expiry, compatibility, file hashes, health criteria). The
*model* manifest the inference runtime reads from a model directory (preprocessing,
threshold, raw inputs; edgerund.inference.manifest.ModelManifest) is a different document
with another lifetime; the bundle carries it verbatim as `model_manifest`, covered by the
signature. Both declare the graph's tensors with the one `TensorSpec` of
edgerund.updates.abi.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import time
from typing import Any

import msgspec

from edgerund.errors import TrustError
from edgerund.updates.abi import IoSignature

MANIFEST_DOMAIN = b"edgerund-manifest-v1\x00"
KEYRING_DOMAIN = b"edgerund-keyring-v1\x00"
SCHEMA_VERSION = 1

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PATH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,3}$")
# Names the slot reserves for itself: a payload file may not overwrite them.
RESERVED_PATHS = frozenset(
    {"manifest.json", "manifest.sig", "bundle.json", "bundle.sig", "slot.json"}
)


class Compatibility(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    hardware_ids: list[str]  # gateway.hardware_id must be listed; "*" matches any
    min_daemon: str = "0.0.0"
    opset_min: int = 1
    opset_max: int = 21


class Health(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    golden_file: str = "golden-io.npz"
    atol: float = 1e-4
    rtol: float = 1e-3
    latency_p95_ms: float = 50.0  # absolute budget for one inference, p95
    max_rel_latency: float = 3.0  # p95 ratio to the current model, same precheck run
    load_timeout_s: float = 30.0
    probation_s: float | None = None  # None: the device's updates.probation_s
    score_min: float | None = None  # probation: recent score mean must stay in range
    score_max: float | None = None


class FileEntry(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    sha256: str
    size: int


class BundleManifest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The signed manifest of a model bundle (`manifest.json` in the bundle tar)."""

    schema: int
    bundle_id: str
    model_name: str
    version: str
    security_counter: int
    created: str  # RFC 3339 UTC, "2026-11-29T05:00:00Z"
    expires: str
    compatibility: Compatibility
    io_signature: IoSignature
    files: list[FileEntry]
    health: Health = msgspec.field(default_factory=Health)
    # The inference runtime's own manifest (models/<name>/manifest.json), written verbatim
    # as manifest.json into the slot so ModelRunner.load() finds it. Covered by the signature.
    model_manifest: dict[str, Any] | None = None
    description: str = ""


class SignatureEntry(msgspec.Struct, forbid_unknown_fields=True):
    keyid: str
    sig: str  # base64 of the 64-byte Ed25519 signature


class SignatureFile(msgspec.Struct, forbid_unknown_fields=True):
    signatures: list[SignatureEntry]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(data: bytes, what: str, code: str) -> Any:
    """Parse JSON refusing duplicate keys, NaN/Infinity and non-UTF-8."""
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise TrustError(code, f"{what} is not valid strict JSON: {exc}") from None


def canonical(obj: Any) -> bytes:
    """The canonical byte form of a JSON value (sorted keys, compact, UTF-8)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def signing_message(domain: bytes, obj: Any) -> bytes:
    return domain + canonical(obj)


def parse_time(s: str, field: str) -> float:
    """RFC 3339 UTC ('Z' suffix, optional fraction) -> epoch seconds."""
    m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?Z", s)
    if not m:
        raise TrustError(
            "manifest_malformed",
            f"{field}: expected RFC 3339 UTC like 2026-01-01T00:00:00Z, got {s!r}",
        )
    y, mo, d, h, mi, se = (int(g) for g in m.groups()[:6])
    try:
        t = calendar.timegm((y, mo, d, h, mi, se, 0, 0, 0))
        time.gmtime(t)
    except (ValueError, OverflowError):
        raise TrustError("manifest_malformed", f"{field}: not a valid date: {s!r}") from None
    return float(t) + (float(m.group(7)) if m.group(7) else 0.0)


def format_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_version(v: str | int) -> tuple[int, ...]:
    """'1.2.3' -> (1, 2, 3); integers are one-component versions. Pre-release tags refused."""
    s = str(v)
    if not re.fullmatch(r"\d{1,9}(\.\d{1,9}){0,3}", s):
        raise TrustError(
            "manifest_malformed", f"version: expected dotted integers like 1.2.3, got {s!r}"
        )
    parts = tuple(int(p) for p in s.split("."))
    # Normalise trailing zeros so 1.2 == 1.2.0.
    while len(parts) > 1 and parts[-1] == 0:
        parts = parts[:-1]
    return parts


def parse_manifest_json(data: bytes) -> dict[str, Any]:
    """manifest.json's bytes -> its JSON object (strict JSON, not yet validated)."""
    raw = strict_json(data, "manifest.json", "manifest_malformed")
    if not isinstance(raw, dict):
        raise TrustError(
            "manifest_malformed", f"manifest.json: expected an object, got {type(raw).__name__}"
        )
    return raw


def manifest_from_json(raw: dict[str, Any]) -> BundleManifest:
    """Validate a parsed manifest.json object into the struct."""
    try:
        m = msgspec.convert(raw, BundleManifest)
    except msgspec.ValidationError as exc:
        raise TrustError("manifest_malformed", f"manifest.json: {exc}") from None
    validate_manifest(m)
    return m


def decode_manifest(data: bytes) -> tuple[BundleManifest, dict[str, Any]]:
    """Parse and validate manifest.json. Returns the struct and the raw JSON value (the
    signature is checked over the canonical form of the raw value, so unknown-field
    handling can never differ between what is signed and what is used)."""
    raw = parse_manifest_json(data)
    return manifest_from_json(raw), raw


def validate_manifest(m: BundleManifest) -> None:
    def bad(msg: str) -> TrustError:
        return TrustError("manifest_malformed", msg)

    if m.schema != SCHEMA_VERSION:
        raise bad(f"schema: expected {SCHEMA_VERSION}, got {m.schema}")
    if not _NAME_RE.match(m.model_name):
        raise bad(f"model_name: expected [A-Za-z0-9._-]{{1,64}}, got {m.model_name!r}")
    if not m.bundle_id or len(m.bundle_id) > 128:
        raise bad(f"bundle_id: expected 1..128 characters, got {len(m.bundle_id)}")
    parse_version(m.version)
    parse_version(m.compatibility.min_daemon)
    if m.security_counter < 0 or m.security_counter > 2**31:
        raise bad(f"security_counter: expected 0..2^31, got {m.security_counter}")
    parse_time(m.created, "created")
    parse_time(m.expires, "expires")
    if not m.compatibility.hardware_ids:
        raise bad("compatibility.hardware_ids: expected at least one id (or '*'), got none")
    if not m.files:
        raise bad("files: expected at least model.onnx, got none")
    seen: set[str] = set()
    for i, f in enumerate(m.files):
        if not _PATH_RE.match(f.path) or ".." in f.path.split("/"):
            raise bad(
                f"files[{i}].path: expected a relative path of [A-Za-z0-9._-] parts, got {f.path!r}"
            )
        if f.path in RESERVED_PATHS:
            raise bad(f"files[{i}].path: {f.path!r} is reserved")
        if f.path in seen:
            raise bad(f"files[{i}].path: {f.path!r} listed twice")
        seen.add(f.path)
        if not _SHA256_RE.match(f.sha256):
            raise bad(f"files[{i}].sha256: expected 64 lowercase hex digits, got {f.sha256!r}")
        if f.size < 0:
            raise bad(f"files[{i}].size: expected >= 0, got {f.size}")
    if "model.onnx" not in seen:
        raise bad("files: expected an entry for model.onnx, got none")
    if m.health.golden_file not in seen:
        raise bad(f"health.golden_file: {m.health.golden_file!r} is not listed in files")
    h = m.health
    for name in ("atol", "rtol", "latency_p95_ms", "max_rel_latency", "load_timeout_s"):
        v = getattr(h, name)
        if not math.isfinite(v) or v < 0:
            raise bad(f"health.{name}: expected a finite value >= 0, got {v}")
    if h.probation_s is not None and (not math.isfinite(h.probation_s) or h.probation_s < 0):
        raise bad(f"health.probation_s: expected >= 0, got {h.probation_s}")
    if not m.io_signature.inputs or not m.io_signature.outputs:
        raise bad("io_signature: expected at least one input and one output")


def decode_signatures(data: bytes) -> SignatureFile:
    raw = strict_json(data, "manifest.sig", "signature_malformed")
    try:
        return msgspec.convert(raw, SignatureFile)
    except msgspec.ValidationError as exc:
        raise TrustError("signature_malformed", f"manifest.sig: {exc}") from None
