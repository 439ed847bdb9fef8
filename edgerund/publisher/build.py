"""Publisher-side tools: Ed25519 keys, keyrings and signed bundles (used by `edgerund bundle`,
the tests and the benchmark). Nothing here runs on the device's update path.

Keys: the private key is PEM PKCS#8 (file mode 0600), the public key PEM
SubjectPublicKeyInfo; the keyid is the SHA-256 of the raw 32-byte public key.
Bundles are written deterministically (sorted payload, mtime 0, uid/gid 0) so the same
inputs give the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgerund.updates.keyring import KEYRING_TYPE, keyid_of
from edgerund.updates.manifest import KEYRING_DOMAIN, MANIFEST_DOMAIN, format_time, signing_message


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keyid(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return keyid_of(raw_public(pub))


def keygen(out_dir: Path, name: str) -> tuple[Path, Path, str]:
    key = Ed25519PrivateKey.generate()
    out_dir.mkdir(parents=True, exist_ok=True)
    priv = out_dir / f"{name}.key"
    pub = out_dir / f"{name}.pub"
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub, keyid(key)


def load_private(path: Path) -> Ed25519PrivateKey:
    k = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(k, Ed25519PrivateKey):
        raise ValueError(f"{path}: expected an Ed25519 private key")
    return k


def load_public(path: Path) -> Ed25519PublicKey:
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        return load_private(path).public_key()
    k = serialization.load_pem_public_key(data)
    if not isinstance(k, Ed25519PublicKey):
        raise ValueError(f"{path}: expected an Ed25519 public key")
    return k


def sign(message: bytes, keys: Iterable[Ed25519PrivateKey]) -> list[dict[str, str]]:
    return [{"keyid": keyid(k), "sig": base64.b64encode(k.sign(message)).decode()} for k in keys]


def make_keyring(
    public_keys: Sequence[Ed25519PublicKey],
    *,
    threshold: int,
    version: int,
    signers: Iterable[Ed25519PrivateKey],
    expires: float | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    signed = {
        "type": KEYRING_TYPE,
        "version": version,
        "expires": format_time(expires if expires is not None else time.time() + 5 * 365 * 86400),
        "threshold": threshold,
        "keys": [
            {
                "keyid": keyid(k),
                "public": base64.b64encode(raw_public(k)).decode(),
                "name": names[i] if names else "",
            }
            for i, k in enumerate(public_keys)
        ],
    }
    return {"signed": signed, "signatures": sign(signing_message(KEYRING_DOMAIN, signed), signers)}


def keyring_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def io_signature_of(model: bytes) -> dict[str, Any]:
    """The ONNX graph inputs/outputs, read with onnxruntime."""
    import onnxruntime as ort

    from edgerund.updates.abi import ORT_DTYPES

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def desc(items: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": i.name,
                "dtype": ORT_DTYPES.get(i.type, i.type),
                "shape": [d if isinstance(d, int) else None for d in i.shape],
            }
            for i in items
        ]

    return {"inputs": desc(sess.get_inputs()), "outputs": desc(sess.get_outputs())}


def _golden_inputs(model: bytes, npz: Path) -> dict[str, Any] | None:
    """Realistic golden inputs: arrays of the model directory's golden.npz named like the
    graph inputs, reshaped to (samples, *input shape)."""
    if not npz.exists():
        return None
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out: dict[str, Any] = {}
    with np.load(npz, allow_pickle=False) as z:
        for i in sess.get_inputs():
            if i.name not in z:
                return None
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
            arr = np.asarray(z[i.name])
            per = int(np.prod(shape))
            if arr.size % per:
                return None
            out[i.name] = arr.reshape((arr.size // per, *shape))
    return out


def opset_of(model: bytes) -> tuple[int, int]:
    """(opset, opset) of the model's default ONNX domain (needs the `onnx` build
    dependency; (1, 17) when it is not installed)."""
    try:
        import onnx
    except ImportError:
        return (1, 17)
    m = onnx.load_from_string(model)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            return (int(o.version), int(o.version))
    return (1, 17)


def make_golden(
    model: bytes, n: int = 8, seed: int = 7, inputs: Mapping[str, Any] | None = None
) -> bytes:
    """golden-io.npz: `in.X` inputs (given, or seeded standard-normal samples) and the
    outputs onnxruntime computes for them now (the reference the device must reproduce)."""
    import numpy as np
    import onnxruntime as ort

    from edgerund.updates.abi import ORT_DTYPES

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    ins: dict[str, Any] = {}
    for i in sess.get_inputs():
        if inputs is not None and i.name in inputs:
            ins[i.name] = np.asarray(inputs[i.name])
            continue
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        dt = ORT_DTYPES.get(i.type, "float32")
        arr = rng.standard_normal((n, *shape))
        ins[i.name] = (
            np.clip(np.round(arr * 20), -127, 127) if dt.startswith("int") else arr
        ).astype(dt)
    count = int(next(iter(ins.values())).shape[0])
    outs: dict[str, list[Any]] = {o.name: [] for o in sess.get_outputs()}
    for s in range(count):
        res = sess.run(None, {k: v[s] for k, v in ins.items()})
        for o, r in zip(sess.get_outputs(), res, strict=True):
            outs[o.name].append(np.asarray(r))
    arrays = {f"in.{k}": v for k, v in ins.items()}
    arrays.update({f"out.{k}": np.stack(v) for k, v in outs.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def make_manifest(
    *,
    model_name: str,
    version: str,
    security_counter: int,
    files: Mapping[str, bytes],
    io_signature: Mapping[str, Any],
    hardware_ids: Sequence[str] = ("*",),
    created: float | None = None,
    expires: float | None = None,
    health: Mapping[str, Any] | None = None,
    model_manifest: Mapping[str, Any] | None = None,
    min_daemon: str = "0.1.0",
    opset_range: tuple[int, int] = (1, 17),
    bundle_id: str | None = None,
    description: str = "",
) -> dict[str, Any]:
    now = time.time()
    created = now if created is None else created
    man: dict[str, Any] = {
        "schema": 1,
        "bundle_id": bundle_id or str(uuid.uuid4()),
        "model_name": model_name,
        "version": version,
        "security_counter": security_counter,
        "created": format_time(created),
        "expires": format_time(expires if expires is not None else created + 365 * 86400),
        "compatibility": {
            "hardware_ids": list(hardware_ids),
            "min_daemon": min_daemon,
            "opset_min": opset_range[0],
            "opset_max": opset_range[1],
        },
        "io_signature": dict(io_signature),
        "files": [
            {"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
            for p, d in sorted(files.items())
        ],
        "health": dict(health or {}),
    }
    if model_manifest is not None:
        man["model_manifest"] = dict(model_manifest)
    if description:
        man["description"] = description
    return man


def sign_manifest(manifest: Mapping[str, Any], keys: Iterable[Ed25519PrivateKey]) -> bytes:
    return json.dumps(
        {"signatures": sign(signing_message(MANIFEST_DOMAIN, manifest), keys)}, indent=2
    ).encode()


def write_tar(out: Path, members: Sequence[tuple[str, bytes]]) -> None:
    """Members in the given order (manifest.json, manifest.sig first), deterministic.

    Plain POSIX ustar, regular files only: exactly what the device's reader
    (edgerund.updates.tarread) accepts. USTAR_FORMAT makes tarfile raise instead of
    emitting a pax header when a name (> 255 bytes) or a size (>= 8 GiB) does not fit."""
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            ti.mtime = 0
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            tf.addfile(ti, io.BytesIO(data))
    os.replace(tmp, out)


def write_bundle(
    out: Path,
    manifest: Mapping[str, Any],
    files: Mapping[str, bytes],
    keys: Iterable[Ed25519PrivateKey],
) -> None:
    mbytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    write_tar(
        out,
        [
            ("manifest.json", mbytes),
            ("manifest.sig", sign_manifest(manifest, keys)),
            *sorted(files.items()),
        ],
    )


def build_from_dir(
    model_dir: Path,
    out: Path,
    keys: Sequence[Ed25519PrivateKey],
    *,
    version: str | None = None,
    security_counter: int = 1,
    model_name: str | None = None,
    hardware_ids: Sequence[str] = ("*",),
    expires_days: float = 365.0,
    health: Mapping[str, Any] | None = None,
    golden: Path | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Pack a model directory (model.onnx, manifest.json, other files) as a signed bundle.
    The directory's manifest.json (the inference runtime's) travels as `model_manifest`;
    golden-io.npz is taken from the directory or `golden`, else computed now."""
    model = (model_dir / "model.onnx").read_bytes()
    mm: dict[str, Any] | None = None
    if (model_dir / "manifest.json").exists():
        mm = json.loads((model_dir / "manifest.json").read_text())
    files: dict[str, bytes] = {"model.onnx": model}
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir).as_posix()
        if (
            p.is_file()
            and rel not in ("model.onnx", "manifest.json", "slot.json", *exclude)
            and not rel.startswith(".")
        ):
            files[rel] = p.read_bytes()
    if golden is not None:
        files["golden-io.npz"] = golden.read_bytes()
    elif "golden-io.npz" not in files:
        files["golden-io.npz"] = make_golden(
            model, inputs=_golden_inputs(model, model_dir / "golden.npz")
        )
    health = dict(health or {})
    g = (mm or {}).get("golden")
    if isinstance(g, dict):  # the model's own golden tolerances, unless overridden
        for key in ("atol", "rtol"):
            if isinstance(g.get(key), (int, float)):
                health.setdefault(key, float(g[key]))
    name = model_name or (mm or {}).get("name") or model_dir.name
    ver = version or str((mm or {}).get("version") or "1.0.0")
    if mm is not None:
        # One version, signed, everywhere: the runtime (loops, the PCR binding) reads the
        # model manifest's, `models` the bundle's; the device refuses a bundle where they
        # differ (version_mismatch).
        mm = {**mm, "version": ver}
    man = make_manifest(
        model_name=str(name),
        version=ver,
        security_counter=security_counter,
        files=files,
        io_signature=io_signature_of(model),
        hardware_ids=hardware_ids,
        expires=time.time() + expires_days * 86400,
        health=health,
        model_manifest=mm,
        opset_range=opset_of(model),
    )
    write_bundle(out, man, files, keys)
    return man
