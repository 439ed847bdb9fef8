"""`edgerund bundle ...`: publisher tools (keys, keyrings, signed bundles, offline verify).

edgerund bundle keygen NAME [--out DIR]
edgerund bundle build --model-dir DIR --key K.key [--key K2.key] -o OUT.bundle
                      [--name N] [--version V] [--counter N] [--hardware-id ID ...]
                      [--expires-days D] [--golden FILE] [--probation-s S]
                      [--latency-p95-ms MS] [--atol A] [--rtol R] [--max-rel-latency X]
edgerund bundle verify BUNDLE --keyring FILE [--hardware-id ID] [--installed-version V]
                      [--counter N] [--max-counter-jump N] [--bundle-max-mb MB]
edgerund bundle keyring create --pub K.pub ... --threshold T --sign K.key ... -o FILE
edgerund bundle keyring rotate --old FILE --pub K.pub ... --threshold T
                      --sign K.key ... -o FILE       (version = old + 1; sign with a
                      threshold of the OLD keys and of the NEW keys)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgerund import __version__
from edgerund.errors import TrustError


def _keygen(args: argparse.Namespace) -> int:
    from edgerund.publisher.build import keygen

    try:
        priv, pub, kid = keygen(Path(args.out), args.name)
    except FileExistsError:
        print(
            f"error: {Path(args.out) / (args.name + '.key')} exists; refusing to overwrite a key",
            file=sys.stderr,
        )
        return 1
    print(json.dumps({"private": str(priv), "public": str(pub), "keyid": kid}))
    return 0


def _build(args: argparse.Namespace) -> int:
    from edgerund.publisher.build import build_from_dir, load_private

    health: dict[str, Any] = {}
    for key in ("probation_s", "latency_p95_ms", "atol", "rtol", "max_rel_latency"):
        v = getattr(args, key)
        if v is not None:
            health[key] = v
    try:
        keys = [load_private(Path(k)) for k in args.key]
        man = build_from_dir(
            Path(args.model_dir),
            Path(args.output),
            keys,
            version=args.version,
            security_counter=args.counter,
            model_name=args.name,
            hardware_ids=args.hardware_id or ["*"],
            expires_days=args.expires_days,
            health=health,
            golden=Path(args.golden) if args.golden else None,
            exclude=args.exclude or (),
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "bundle": args.output,
                "model_name": man["model_name"],
                "version": man["version"],
                "security_counter": man["security_counter"],
                "bundle_id": man["bundle_id"],
                "files": [f["path"] for f in man["files"]],
            }
        )
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from edgerund.updates.abi import runtime_max_opset
    from edgerund.updates.bundle import BundleReader
    from edgerund.updates.keyring import parse_keyring
    from edgerund.updates.manifest import parse_manifest_json
    from edgerund.updates.trust import Device, Installed, Limits, check_size, verify_document

    limits = Limits(
        int(args.bundle_max_mb * 1048576),
        int(args.bundle_max_mb * 1048576),
        args.max_counter_jump,
    )
    try:
        kr = parse_keyring(Path(args.keyring).read_bytes())
        with BundleReader(Path(args.bundle)) as reader, tempfile.TemporaryDirectory() as td:
            check_size(reader.size, limits)
            head = reader.head(256 * 1024)
            document = parse_manifest_json(head.manifest_bytes)
            name = document.get("model_name")
            verdict = verify_document(
                document,
                head.sig_bytes,
                kr,
                now=time.time(),
                device=Device(args.hardware_id, __version__, runtime_max_opset(), [str(name)]),
                installed=Installed(counter=args.counter, version=args.installed_version),
                limits=limits,
            )
            reader.extract(Path(td), verdict.manifest, limits)
    except TrustError as exc:
        print(json.dumps({"ok": False, "reason": exc.code, "message": str(exc).split(": ", 1)[-1]}))
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    mf = verdict.manifest
    print(
        json.dumps(
            {
                "ok": True,
                "model_name": mf.model_name,
                "version": mf.version,
                "security_counter": mf.security_counter,
                "expires": mf.expires,
                "signed_by": sorted(verdict.signed_by),
                "manifest_sha256": verdict.manifest_sha256,
            }
        )
    )
    return 0


def _keyring(args: argparse.Namespace) -> int:
    from edgerund.publisher.build import keyring_bytes, load_private, load_public, make_keyring
    from edgerund.updates.keyring import check_rotation, check_self_signed, parse_keyring

    try:
        pubs = [load_public(Path(p)) for p in args.pub]
        signers = [load_private(Path(k)) for k in args.sign]
        expires = time.time() + args.expires_days * 86400
        if args.keyring_cmd == "create":
            doc = make_keyring(
                pubs,
                threshold=args.threshold,
                version=args.version,
                signers=signers,
                expires=expires,
            )
            data = keyring_bytes(doc)
            check_self_signed(parse_keyring(data))
        else:
            old = parse_keyring(Path(args.old).read_bytes())
            doc = make_keyring(
                pubs,
                threshold=args.threshold,
                version=old.version + 1,
                signers=signers,
                expires=expires,
            )
            data = keyring_bytes(doc)
            check_rotation(old, parse_keyring(data), time.time())
    except TrustError as exc:
        print(json.dumps({"ok": False, "reason": exc.code, "message": str(exc).split(": ", 1)[-1]}))
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    Path(args.output).write_bytes(data)
    print(
        json.dumps(
            {
                "ok": True,
                "keyring": args.output,
                "version": doc["signed"]["version"],
                "threshold": args.threshold,
                "keys": len(pubs),
            }
        )
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bundle",
        help="signing keys, keyrings and signed model bundles",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bs = p.add_subparsers(dest="bundle_cmd", required=True)

    k = bs.add_parser("keygen", help="make an Ed25519 signing key pair (NAME.key, NAME.pub)")
    k.add_argument("name")
    k.add_argument("--out", default=".", help="directory (default .)")
    k.set_defaults(func=_keygen)

    b = bs.add_parser("build", help="pack and sign a model directory as a bundle")
    b.add_argument(
        "--model-dir", required=True, help="directory with model.onnx (+ manifest.json, golden)"
    )
    b.add_argument(
        "--key", action="append", required=True, help="private key (repeat for a threshold)"
    )
    b.add_argument("-o", "--output", required=True)
    b.add_argument(
        "--name", help="model name (default: manifest.json name, else the directory name)"
    )
    b.add_argument("--version", help="version like 1.2.0 (default: manifest.json version)")
    b.add_argument(
        "--counter", type=int, default=1, help="security counter (anti-rollback), default 1"
    )
    b.add_argument(
        "--hardware-id", action="append", help="compatible gateway.hardware_id (repeat; default *)"
    )
    b.add_argument("--expires-days", type=float, default=365.0)
    b.add_argument("--golden", help="golden-io.npz (in.X / out.Y arrays); default: computed now")
    b.add_argument(
        "--exclude", action="append", help="file of the model directory to leave out (repeat)"
    )
    b.add_argument("--probation-s", dest="probation_s", type=float)
    b.add_argument("--latency-p95-ms", dest="latency_p95_ms", type=float)
    b.add_argument("--max-rel-latency", dest="max_rel_latency", type=float)
    b.add_argument("--atol", type=float)
    b.add_argument("--rtol", type=float)
    b.set_defaults(func=_build)

    v = bs.add_parser(
        "verify", help="verify a bundle offline against a keyring (exit 0 ok, 1 refused)"
    )
    v.add_argument("bundle")
    v.add_argument("--keyring", required=True)
    v.add_argument("--hardware-id", default="generic")
    v.add_argument("--installed-version", default=None)
    v.add_argument(
        "--counter", type=int, default=0, help="stored security counter to check against"
    )
    v.add_argument("--max-counter-jump", type=int, default=16)
    v.add_argument("--bundle-max-mb", type=float, default=64.0)
    v.set_defaults(func=_verify)

    kr = bs.add_parser("keyring", help="create or rotate a device keyring")
    ks = kr.add_subparsers(dest="keyring_cmd", required=True)
    for name in ("create", "rotate"):
        c = ks.add_parser(name)
        if name == "rotate":
            c.add_argument("--old", required=True, help="the keyring in force (version N)")
        else:
            c.add_argument("--version", type=int, default=1)
        c.add_argument(
            "--pub", action="append", required=True, help="public key of the new keyring (repeat)"
        )
        c.add_argument("--threshold", type=int, required=True)
        c.add_argument(
            "--sign",
            action="append",
            required=True,
            help="private key signing the keyring (repeat; for rotate: old AND new owners)",
        )
        c.add_argument("--expires-days", type=float, default=5 * 365.0)
        c.add_argument("-o", "--output", required=True)
        c.set_defaults(func=_keyring)
