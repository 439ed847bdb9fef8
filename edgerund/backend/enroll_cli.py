"""`edgerund attest enroll`: AK enrolment by credential activation (the I/O around enroll.py).

Direct (the verifier reaches the daemon's socket: on the gateway, or forwarded with
`ssh -L /tmp/gw.sock:/run/edgerund/diag.sock gw`):

    edgerund attest enroll --socket PATH --ek-ca CA.pem --out ak.pem

reads `identity`, checks the EK certificate and the AK, sends `attest-activate`, checks the
secret, asks for a quote with a fresh nonce and verifies it against the new pin, NV binding
included (so a success means the whole chain works), then writes ak.pem and the enrolment
record (enrolment_record.py: the AK and the NV binding index Name certified in that quote,
which `attest verify --enrolment` pins). Offline, in two steps:

    edgerund attest enroll --identity ID.json --ek-ca CA.pem \\
                           --challenge-out CH.json --pending-out PENDING.json
    (device)  edgerunctl --json call attest-activate "$(cat CH.json)" > RESP.json
              edgerunctl --json attest --nonce NONCE > RESULT.json
    edgerund attest enroll --pending PENDING.json --response RESP.json --out ak.pem \\
                           [--result RESULT.json --nonce NONCE]

PENDING.json holds the expected secret: keep it on the verifier (mode 0600). With
`--result`/`--nonce` (a result taken after the activation, with a nonce the verifier chose)
the second step verifies it with the proven AK and records its NV index Name; without, the
record has no NV pin.
Exit 0 enrolled, 1 refused (`INVALID (code): message`), 2 usage or daemon unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from edgerund.backend.ekcert import load_ca_bundle
from edgerund.backend.enroll import Enrolled, Pending, begin, finish, parse_device_facts
from edgerund.backend.enrolment_record import EnrolmentRecord, record_path_for
from edgerund.backend.verify import Verdict, VerifyError, verify_result
from edgerund.identity.binding import parse_nonce


class _Usage(Exception):
    pass


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(sys.stdin.read() if path == "-" else Path(path).read_text())
    except OSError as exc:
        raise _Usage(f"cannot read the {what} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise _Usage(f"{path}: not JSON: {exc}") from None


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _anchors(args: argparse.Namespace) -> list[x509.Certificate] | None:
    if not args.ek_ca:
        return None
    try:
        return load_ca_bundle(Path(args.ek_ca).read_bytes(), f"--ek-ca {args.ek_ca}")
    except OSError as exc:
        raise _Usage(f"cannot read --ek-ca {args.ek_ca}: {exc.strerror}") from None
    except ValueError as exc:
        raise _Usage(str(exc)) from None


def check_first_quote(quote: Any, nonce: bytes, ak_pem: str) -> tuple[Verdict, str | None]:
    """Verify a quote with the just-proven AK; returns (verdict, warning or None).

    The NV binding index Name is pinned here, at registration (trust on first use, as
    docs/identity.md prescribes): it is the Name the proven AK certified over our fresh
    nonce, and the rest of the NV binding is verified against it. A result without
    `nv_binding` (a gateway from before it) enrols the AK with a warning and no NV pin.
    """
    nvb = quote.get("nv_binding") if isinstance(quote, dict) else None
    if not isinstance(nvb, dict):
        verdict = verify_result(quote, nonce=nonce, ak_pem=ak_pem, insecure_skip_nv_binding=True)
        warn = "the result has no NV binding: the NV index Name is not pinned"
        return verdict, warn if verdict.ok and quote.get("kind") != "software" else None
    try:
        name = bytes.fromhex(str(nvb.get("name")))
    except ValueError:
        raise VerifyError("nv_binding_malformed", "nv_binding.name is not hex") from None
    verdict = verify_result(quote, nonce=nonce, ak_pem=ak_pem, nv_name=name)
    return verdict, None


def _done(
    args: argparse.Namespace,
    enrolled: Enrolled,
    extra: dict[str, Any],
    verdict: Verdict | None = None,
    warning: str | None = None,
) -> int:
    nv = verdict.nv_binding if verdict is not None else None
    record = EnrolmentRecord(
        enrolled.ak_name, enrolled.ak_pem,
        None if nv is None else str(nv["index"]),
        None if nv is None else bytes.fromhex(nv["name"]),
    )  # fmt: skip
    record_file = args.record or record_path_for(args.out)
    warnings = list(enrolled.warnings)
    if nv is None:
        warnings.append(
            warning
            or "NV binding index Name not pinned (no attestation result verified): "
            "`attest verify` needs --nv-name or --insecure-skip-nv-binding"
        )
    Path(args.out).write_text(enrolled.ak_pem)
    Path(record_file).write_text(json.dumps(record.as_dict(), indent=2) + "\n")
    out = {"enrolled": True, "ak_name": enrolled.ak_name.hex(), "ak_pem_file": args.out,
           "record_file": record_file, "nv_binding": record.as_dict()["nv_binding"],
           "warnings": warnings, **extra}  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"ENROLLED: AK {enrolled.ak_name.hex()} proven by credential activation; "
              f"pinned in {args.out}")  # fmt: skip
        if nv is not None:
            print(f"NV binding index {nv['index']} Name {nv['name']} pinned; "
                  f"enrolment record {record_file}")  # fmt: skip
        else:
            print(f"enrolment record {record_file} (AK only)")
        for w in warnings:
            print(f"warning: {w}")
    return 0


def _direct(args: argparse.Namespace) -> int:
    from edgerund.ctl.client import DiagClient, Unreachable
    from edgerund.errors import CommandError

    anchors = _anchors(args)
    try:
        with DiagClient(args.socket, timeout_s=args.timeout) as c:
            facts = parse_device_facts(c.call("identity"))
            challenge, pending = begin(
                facts, anchors, insecure_skip_ek_cert=args.insecure_skip_ek_cert
            )
            try:
                response = c.call("attest-activate", challenge)
            except CommandError as exc:
                if exc.code in ("activation_failed", "not_supported"):
                    raise VerifyError("activation_failed", f"{exc.code}: {exc.message}") from None
                raise
            enrolled = finish(pending, response)
            nonce = os.urandom(32)
            quote = c.call("attest", {"nonce": nonce.hex()})
    except (Unreachable, CommandError) as exc:
        raise _Usage(f"daemon at {args.socket}: {exc}") from None
    verdict, warning = check_first_quote(quote, nonce, enrolled.ak_pem)
    if not verdict.ok:
        raise VerifyError(verdict.code, f"a quote with the enrolled AK failed: {verdict.message}")
    return _done(args, enrolled, {"quote": verdict.as_dict()}, verdict, warning)


def _second_step(args: argparse.Namespace) -> int:
    pending = Pending.from_dict(_read_json(args.pending, "pending state"))
    enrolled = finish(pending, _read_json(args.response, "response"))
    if not args.result:
        return _done(args, enrolled, {})
    try:
        nonce = parse_nonce(args.nonce)
    except ValueError as exc:
        raise _Usage(f"--nonce: {exc}") from None
    quote = _read_json(args.result, "result")
    if isinstance(quote, dict) and isinstance(quote.get("result"), dict):
        quote = quote["result"]  # a raw socket response
    verdict, warning = check_first_quote(quote, nonce, enrolled.ak_pem)
    if not verdict.ok:
        raise VerifyError(
            verdict.code, f"the result with the enrolled AK failed: {verdict.message}"
        )
    return _done(args, enrolled, {"quote": verdict.as_dict()}, verdict, warning)


def cmd_enroll(args: argparse.Namespace) -> int:
    try:
        if not (args.pending or args.response or args.ek_ca or args.insecure_skip_ek_cert):
            raise _Usage("give --ek-ca FILE (the EK CA bundle) or --insecure-skip-ek-cert")
        if args.pending or args.response:
            if not (args.pending and args.response and args.out):
                raise _Usage("the second step needs --pending, --response and --out")
            if bool(args.result) != bool(args.nonce):
                raise _Usage("--result and --nonce go together (the result's nonce, hex)")
            return _second_step(args)
        if args.identity:
            if not (args.challenge_out and args.pending_out):
                raise _Usage("--identity needs --challenge-out and --pending-out")
            facts = parse_device_facts(_read_json(args.identity, "identity"))
            challenge, pend = begin(
                facts, _anchors(args), insecure_skip_ek_cert=args.insecure_skip_ek_cert
            )
            _write_private(args.pending_out, json.dumps(pend.as_dict()) + "\n")
            Path(args.challenge_out).write_text(json.dumps(challenge) + "\n")
            print(f"challenge written to {args.challenge_out}; on the gateway run: edgerunctl "
                  f"--json call attest-activate \"$(cat {args.challenge_out})\"")  # fmt: skip
            return 0
        if not (args.socket and args.out):
            raise _Usage("give --socket PATH --out AK.pem (or the offline --identity/--pending)")
        return _direct(args)
    except _Usage as exc:
        print(f"edgerund attest enroll: {exc}", file=sys.stderr)
        return 2
    except VerifyError as exc:
        if args.json:
            print(json.dumps({"enrolled": False, "code": exc.code, "message": exc.message}))
        else:
            print(f"INVALID ({exc.code}): {exc.message}")
        return 1


def add_enroll_parser(asub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = asub.add_parser(
        "enroll",
        help="prove the gateway's AK by credential activation and pin it (writes --out)",
    )
    e.add_argument("--socket", help="the daemon's diagnostics socket (direct enrolment)")
    e.add_argument("--ek-ca", metavar="FILE", help="PEM bundle of the accepted EK CAs")
    e.add_argument("--out", metavar="AK.pem", help="where to write the pinned AK (PEM)")
    e.add_argument("--identity", help="offline step 1: `edgerunctl --json identity` output")
    e.add_argument("--challenge-out", help="offline step 1: args for attest-activate")
    e.add_argument("--pending-out", help="offline step 1: the verifier's secret state (0600)")
    e.add_argument("--pending", help="offline step 2: the state from step 1")
    e.add_argument("--response", help="offline step 2: the device's attest-activate answer")
    e.add_argument("--result", help="offline step 2: an attestation result taken after the "
                   "activation, to pin the NV binding index Name (with --nonce)")  # fmt: skip
    e.add_argument("--nonce", help="offline step 2: the nonce (hex) of --result")
    e.add_argument("--record", metavar="FILE", help="where to write the enrolment record "
                   "(AK + NV index Name; default: <out stem>.enrolment.json)")  # fmt: skip
    e.add_argument(
        "--insecure-skip-ek-cert",
        action="store_true",
        help="INSECURE: do not validate the EK certificate (any EK, even a software one, passes)",
    )
    e.add_argument("--timeout", type=float, default=30.0, help="socket timeout, seconds")
    e.add_argument("--json", action="store_true", help="machine-readable outcome")
    e.set_defaults(func=cmd_enroll)
