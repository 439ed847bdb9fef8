"""`edgerund attest ...`: the upstream verifier (pure Python, no TPM stack needed).

edgerund attest verify --result FILE --nonce HEX (--enrolment FILE | --ak-pem FILE --nv-name HEX)
                       [--previous FILE]
                       [--expect-model MANIFEST ... --expect-config CONFIG]
                       [--expect-overlay [MODEL=]SHA256|none ...]
                       [--allow-software] [--insecure-no-nonce] [--insecure-skip-ak-trust]
                       [--insecure-skip-nv-binding] [--json]
    exit 0: valid; 1: invalid (the reason code and message are printed); 2: usage
    (unreadable file, bad JSON, bad nonce). Without --nonce and --ak-pem the verdict is
    INVALID (no_nonce / ak_untrusted) unless the matching --insecure-... flag is given.
    A TPM result is valid only with its NV binding (verify.py check 12): certified by the
    AK over the same nonce, of the index whose Name was pinned at enrolment (--enrolment:
    the record `attest enroll` wrote, AK included; or --nv-name), its log replaying to
    the certified value, and the LAST event compared with --expect-config/-model/-overlay.
    The PCR binding alone proves nothing against a local attacker (PCR 23 is resettable);
    --insecure-skip-nv-binding (gateways from before the NV binding) checks it alone and
    says so. The verdict names the bindings verified and the models/calibrations of the
    NV binding's last event.
    --expect-model matches a model by its manifest, calibrated or not; a valid verdict
    prints per model the calibration in force (`X+cal.N` and the overlay digest).
    --expect-overlay pins it: the sha256 of the model's calibration.json, or `none` (the
    model must run uncalibrated); without MODEL= it applies to every bound model. It needs
    --expect-config/--expect-model: the PCR log's model names are not measured, so only
    the expected model set keeps an overlay digest from passing as another model.
edgerund attest enroll --socket PATH --ek-ca FILE --out AK.pem [--insecure-skip-ek-cert]
    credential activation against a daemon's socket (on the gateway, or forwarded over
    ssh): check the EK certificate against the CA bundle, MakeCredential for the AK Name,
    `attest-activate`, compare, write the pinned AK, then verify a fresh quote with it.
edgerund attest enroll --identity FILE --ek-ca FILE --challenge-out FILE --pending-out FILE
edgerund attest enroll --pending FILE --response FILE --out AK.pem
    the same in two offline steps (the device runs
    `edgerunctl --json call attest-activate "$(cat CHALLENGE)" > RESPONSE`).
    exit 0: enrolled; 1: refused (code and message printed); 2: usage / unreachable.
edgerund attest export --result FILE --dir DIR
    write ak.pem, quote.msg, quote.sig, pcrs.bin for tpm2_checkquote and print its
    command line, so a quote can be cross-checked with tpm2-tools.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

from edgerund.backend.enrolment_record import EnrolmentRecord, RecordError
from edgerund.backend.verify import Verdict, expected_models_for_files, verify_result
from edgerund.errors import EdgerundError
from edgerund.identity import tpmstruct as ts
from edgerund.identity.binding import ANY_MODEL, parse_nonce


class UsageError(EdgerundError):
    pass


def _load_json(path: str, what: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{path}: not JSON: {exc}") from None
    if isinstance(data, dict) and "result" in data and "attest" not in data:
        data = data["result"]  # a raw socket response {"id", "ok", "result"}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object (the attestation result)")
    return data


def parse_expect_overlay(items: list[str]) -> dict[str, bytes | None] | None:
    """`[MODEL=]SHA256|none` options -> {model name or ANY_MODEL: digest or None}."""
    if not items:
        return None
    out: dict[str, bytes | None] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        key = name if sep else ANY_MODEL
        if sep and not name:
            raise UsageError(f"--expect-overlay {item!r}: empty model name")
        if value.strip().lower() == "none":
            out[key] = None
            continue
        try:
            digest = bytes.fromhex(value.strip())
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise UsageError(
                f"--expect-overlay {item!r}: expected [MODEL=]SHA256 (64 hex digits) or none"
            )
        out[key] = digest
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        result = _load_json(args.result, "result")
        previous = _load_json(args.previous, "previous result") if args.previous else None
        nonce = parse_nonce(args.nonce) if args.nonce is not None else None
        ak_pem, nv_name = _trust_inputs(args)
        config_sha256 = models = None
        if args.expect_model or args.expect_config:
            if not args.expect_config:  # the config is always measured first
                raise UsageError("--expect-model needs --expect-config (the deployed config)")
            # the log replays to the quoted PCR first, then its config and manifests are
            # compared: a calibrated model of an expected manifest matches, and is named
            config_sha256 = hashlib.sha256(Path(args.expect_config).read_bytes()).digest()
            models = expected_models_for_files([Path(m) for m in args.expect_model])
        overlays = parse_expect_overlay(args.expect_overlay)
        if overlays is not None and models is None:  # the PCR does not measure names
            raise UsageError("--expect-overlay needs --expect-config and --expect-model")
    except (UsageError, ValueError, OSError) as exc:
        print(f"edgerund attest verify: {exc}", file=sys.stderr)
        return 2
    verdict = verify_result(
        result, nonce=nonce, previous=previous, ak_pem=ak_pem,
        allow_software=args.allow_software, insecure_skip_ak_trust=args.insecure_skip_ak_trust,
        insecure_no_nonce=args.insecure_no_nonce, expected_config_sha256=config_sha256,
        expected_models=models, expected_overlays=overlays,
        insecure_skip_nv_binding=args.insecure_skip_nv_binding, nv_name=nv_name,
    )  # fmt: skip
    if verdict.ok and args.insecure_skip_nv_binding and result.get("kind") != "software":
        verdict.warnings.append(
            "INSECURE: NV binding not verified (--insecure-skip-nv-binding): only the PCR "
            "binding vouches for the config and models, and any local process with TPM "
            "access can reset and extend that PCR"
        )
    if args.json:
        print(json.dumps(verdict.as_dict(), indent=2))
    elif verdict.ok:
        print_valid(verdict)
    else:
        print(f"INVALID ({verdict.code}): {verdict.message}")
    return 0 if verdict.ok else 1


def _trust_inputs(args: argparse.Namespace) -> tuple[str | None, bytes | None]:
    """(pinned AK PEM, pinned NV index Name) from --enrolment, --ak-pem, --nv-name."""
    ak_pem = Path(args.ak_pem).read_text() if args.ak_pem else None
    nv_name = None
    if args.nv_name:
        try:
            nv_name = bytes.fromhex(args.nv_name.strip())
        except ValueError:
            raise UsageError("--nv-name: expected the index Name as hex digits") from None
    if args.enrolment:
        try:
            rec = EnrolmentRecord.from_dict(_load_json(args.enrolment, "enrolment record"))
        except RecordError as exc:
            raise UsageError(f"{args.enrolment}: {exc}") from None
        if ak_pem is not None and ak_pem.strip() != rec.ak_pem.strip():
            raise UsageError("--ak-pem differs from the AK of the enrolment record")
        if nv_name is not None and rec.nv_name is not None and nv_name != rec.nv_name:
            raise UsageError("--nv-name differs from the Name in the enrolment record")
        ak_pem = rec.ak_pem
        nv_name = nv_name or rec.nv_name
    return ak_pem, nv_name


def _model_lines(models: list[dict[str, Any]]) -> None:
    for m in models:
        cal = m["calibration"]
        what = (
            "no calibration"
            if cal is None
            else f"calibration {cal['version']} (overlay sha256 {cal['overlay_sha256']})"
        )
        print(f"model {m['name']}: manifest sha256 {m['manifest_sha256']}, {what}")


def print_valid(verdict: Verdict) -> None:
    """The human verdict: which binding vouches for what runs, then its models."""
    print(f"VALID: {verdict.message} (resetCount {verdict.reset_count}, "
          f"restartCount {verdict.restart_count}, clock {verdict.clock_ms} ms)")  # fmt: skip
    nv = verdict.nv_binding
    if nv is not None:
        print(f"binding verified: NV index {nv['index']} (Name {nv['name']}, certified by the "
              f"AK with your nonce; last of {nv['events']} events: config sha256 "
              f"{nv['config_sha256']})")  # fmt: skip
        _model_lines(nv["models"])
    elif "pcr" in verdict.bindings_verified:
        print("binding verified: PCR only (NOT the NV binding: forgeable by a local process)")
        _model_lines(verdict.models)
    else:
        print("binding verified: none")
    for w in verdict.warnings:
        print(f"warning: {w}")


def tpm2_tools_pcr_file(sel: ts.PcrSelection, values: list[bytes]) -> bytes:
    """PCR values in tpm2-tools' "serialized" format (what `tpm2_quote -o` writes).

    It is the little-endian in-memory layout of TPML_PCR_SELECTION (count + 16 padded
    8-byte TPMS_PCR_SELECTION) followed by a u32 list count and TPML_DIGESTs of at most 8
    digests each (u32 count + 8 x (u16 size + 64-byte buffer)). tpm2-tools 5.4 mis-reads the
    plain "values" format for more than one PCR, so this is the portable choice.
    """
    out = struct.pack("<I", len(sel))
    for h, ix in sel:
        bitmap = bytearray(4)
        for i in ix:
            bitmap[i // 8] |= 1 << (i % 8)
        out += struct.pack("<HB", h, 3) + bytes(bitmap) + b"\0"
    out += bytes(8 * (16 - len(sel)))
    chunks = [values[i : i + 8] for i in range(0, len(values), 8)]
    out += struct.pack("<I", len(chunks))
    for chunk in chunks:
        out += struct.pack("<I", len(chunk))
        for d in chunk + [b""] * (8 - len(chunk)):
            out += struct.pack("<H", len(d)) + d.ljust(64, b"\0")
    return out


def export_checkquote_files(result: dict[str, Any], out: Path) -> list[str]:
    """Files + argv for `tpm2_checkquote` on the same quote."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ak.pem").write_text(result["ak_pem"])
    (out / "quote.msg").write_bytes(base64.b64decode(result["attest"]))
    (out / "quote.sig").write_bytes(base64.b64decode(result["signature"]))
    sel = ts.parse_pcr_selection_string(result["pcr_selection"])
    values = [bytes.fromhex(result["pcrs"][f"{ts.HASH_NAMES[h]}:{i}"]) for h, ix in sel for i in ix]
    (out / "pcrs.bin").write_bytes(tpm2_tools_pcr_file(sel, values))
    return [
        "tpm2_checkquote", "-u", str(out / "ak.pem"), "-m", str(out / "quote.msg"),
        "-s", str(out / "quote.sig"), "-f", str(out / "pcrs.bin"),
        "-g", "sha256", "-q", result["nonce"],
    ]  # fmt: skip


def cmd_export(args: argparse.Namespace) -> int:
    try:
        result = _load_json(args.result, "result")
        argv = export_checkquote_files(result, Path(args.dir))
    except (UsageError, KeyError, ValueError, OSError) as exc:
        print(f"edgerund attest export: {exc!r}", file=sys.stderr)
        return 2
    print(" ".join(argv))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("attest", help="verify TPM attestation results (pure Python)")
    asub = p.add_subparsers(dest="attest_cmd", required=True)
    v = asub.add_parser("verify", help="verify an attestation result (exit 0 valid, 1 invalid)")
    v.add_argument("--result", required=True, help="result JSON file (from edgerunctl --json "
                   "attest), or - for stdin")  # fmt: skip
    v.add_argument("--nonce", help="the nonce (hex) you sent: checks freshness (required)")
    v.add_argument("--previous", help="an earlier result of the same gateway: clock checks")
    v.add_argument(
        "--expect-model",
        action="append",
        default=[],
        metavar="MANIFEST",
        help="manifest.json of a model that must be active (repeat per model)",
    )
    v.add_argument("--expect-config", metavar="CONFIG",
                   help="the config file deployed (alone: expect no active model)")  # fmt: skip
    v.add_argument(
        "--expect-overlay",
        action="append",
        default=[],
        metavar="[MODEL=]SHA256|none",
        help="the calibration that must be in force: sha256 of the model's calibration.json, "
        "or none (uncalibrated); without MODEL= for every bound model (repeatable)",
    )
    v.add_argument(
        "--ak-pem",
        help="the gateway's AK (PEM) as enrolled by `edgerund attest enroll` (required "
        "unless --enrolment)",
    )
    v.add_argument(
        "--enrolment",
        metavar="FILE",
        help="the enrolment record written by `edgerund attest enroll`: pins the AK and the "
        "NV binding index Name",
    )
    v.add_argument(
        "--nv-name",
        metavar="HEX",
        help="the NV binding index Name pinned at registration (nv_binding.name)",
    )
    v.add_argument(
        "--allow-software",
        action="store_true",
        help="accept an (insecure) software identity result",
    )
    v.add_argument(
        "--insecure-no-nonce",
        action="store_true",
        help="INSECURE: skip the freshness check (a replayed quote passes)",
    )
    v.add_argument(
        "--insecure-skip-ak-trust",
        action="store_true",
        help="INSECURE: trust whatever AK the result names (a quote made in software passes)",
    )
    v.add_argument(
        "--insecure-skip-nv-binding",
        action="store_true",
        help="INSECURE: do not verify the NV binding (gateways from before it); the PCR "
        "binding alone can be forged by any local process with TPM access",
    )
    v.add_argument("--json", action="store_true", help="machine-readable verdict")
    v.set_defaults(func=cmd_verify)
    from edgerund.backend.enroll_cli import add_enroll_parser

    add_enroll_parser(asub)
    e = asub.add_parser("export", help="write files for tpm2_checkquote")
    e.add_argument("--result", required=True)
    e.add_argument("--dir", required=True)
    e.set_defaults(func=cmd_export)
