"""The attack checklist, through the running component: every bundle is refused with its
own reason code, and the running model, `current`, the active slot and the record are
untouched."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerund.component import CommandError, Peer
from edgerund.publisher import build as B
from tests.updates import models as M
from tests.updates.support import Publisher, sha_tree

ROOT = Peer(pid=1, uid=0, gid=0, privileged=True)


def raw_tar(out: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return out


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def signed_parts(
    pub: Publisher, files: dict[str, bytes], **kw: Any
) -> tuple[bytes, bytes, dict[str, Any]]:
    man = pub.manifest(
        files, version=kw.pop("version", "2.0.0"), counter=kw.pop("counter", 1), **kw
    )
    return json.dumps(man).encode(), B.sign_manifest(man, pub.keys[:2]), man


def case_tampered_model(pub: Publisher, d: Path) -> Path:
    files = pub.files(M.affine(2.0))
    mb, sb, _ = signed_parts(pub, files, counter=5)
    bad = dict(files, **{"model.onnx": M.affine(3.0)})
    return raw_tar(
        d / "b",
        [reg("manifest.json", mb), reg("manifest.sig", sb)]
        + [reg(k, v) for k, v in sorted(bad.items())],
    )


def case_tampered_manifest(pub: Publisher, d: Path) -> Path:
    files = pub.files(M.affine(2.0))
    _, sb, man = signed_parts(pub, files)
    man["security_counter"] = 2  # edited after signing
    return raw_tar(
        d / "b",
        [reg("manifest.json", json.dumps(man).encode()), reg("manifest.sig", sb)]
        + [reg(k, v) for k, v in sorted(files.items())],
    )


def case_unsigned(pub: Publisher, d: Path) -> Path:
    files = pub.files(M.affine(2.0))
    mb, _, _ = signed_parts(pub, files)
    return raw_tar(
        d / "b", [reg("manifest.json", mb)] + [reg(k, v) for k, v in sorted(files.items())]
    )


def case_empty_signatures(pub: Publisher, d: Path) -> Path:
    return pub.bundle(d / "b", version="2.0.0", counter=1, signers=[])


def case_wrong_key(pub: Publisher, d: Path) -> Path:
    return pub.bundle(
        d / "b",
        version="2.0.0",
        counter=1,
        signers=[Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()],
    )


def case_below_threshold(pub: Publisher, d: Path) -> Path:
    return pub.bundle(d / "b", version="2.0.0", counter=1, signers=pub.keys[:1])


def case_same_key_twice(pub: Publisher, d: Path) -> Path:
    return pub.bundle(d / "b", version="2.0.0", counter=1, signers=[pub.keys[0], pub.keys[0]])


def case_expired(pub: Publisher, d: Path) -> Path:
    import time

    return pub.bundle(
        d / "b", version="2.0.0", counter=1, created=time.time() - 7200, expires=time.time() - 3600
    )


def case_counter_rollback(pub: Publisher, d: Path) -> Path:
    return pub.bundle(d / "b", version="2.0.0", counter=4)  # stored counter is 5


def case_fast_forward(pub: Publisher, d: Path) -> Path:
    return pub.bundle(d / "b", version="2.0.0", counter=5 + 17)  # max jump 16


def case_version_rollback(pub: Publisher, d: Path) -> Path:
    return pub.bundle(d / "b", version="0.9.0", counter=5)


def case_same_version(pub: Publisher, d: Path) -> Path:
    return pub.bundle(d / "b", version="1.0.0", counter=5)


def case_mix_and_match(pub: Publisher, d: Path) -> Path:
    a = pub.files(M.affine(2.0))
    b = pub.files(M.affine(3.0))
    mb, sb, _ = signed_parts(pub, a, counter=5)
    mixed = {"model.onnx": b["model.onnx"], "golden-io.npz": a["golden-io.npz"]}
    return raw_tar(
        d / "b",
        [reg("manifest.json", mb), reg("manifest.sig", sb)]
        + [reg(k, v) for k, v in sorted(mixed.items())],
    )


def case_missing_file(pub: Publisher, d: Path) -> Path:
    files = pub.files(M.affine(2.0), extra={"notes.txt": b"hello"})
    mb, sb, _ = signed_parts(pub, files, counter=5)
    return raw_tar(
        d / "b",
        [reg("manifest.json", mb), reg("manifest.sig", sb)]
        + [reg(k, v) for k, v in sorted(files.items()) if k != "notes.txt"],
    )


def case_extra_file(pub: Publisher, d: Path) -> Path:
    files = pub.files(M.affine(2.0))
    mb, sb, _ = signed_parts(pub, files, counter=5)
    return raw_tar(
        d / "b",
        [reg("manifest.json", mb), reg("manifest.sig", sb)]
        + [reg(k, v) for k, v in sorted(files.items())]
        + [reg("evil.so", b"\x7fELF")],
    )


def _with_member(pub: Publisher, d: Path, ti: tarfile.TarInfo, data: bytes | None) -> Path:
    files = pub.files(M.affine(2.0))
    mb, sb, _ = signed_parts(pub, files, counter=5)
    return raw_tar(
        d / "b",
        [reg("manifest.json", mb), reg("manifest.sig", sb), (ti, data)]
        + [reg(k, v) for k, v in sorted(files.items())],
    )


def case_path_traversal(pub: Publisher, d: Path) -> Path:
    ti, data = reg("../../../etc/cron.d/evil", b"* * * * * root sh\n")
    return _with_member(pub, d, ti, data)


def case_absolute_path(pub: Publisher, d: Path) -> Path:
    ti, data = reg("/etc/passwd", b"x")
    return _with_member(pub, d, ti, data)


def case_symlink(pub: Publisher, d: Path) -> Path:
    ti = tarfile.TarInfo("model.onnx")
    ti.type = tarfile.SYMTYPE
    ti.linkname = "/etc/shadow"
    return _with_member(pub, d, ti, None)


def case_hardlink(pub: Publisher, d: Path) -> Path:
    ti = tarfile.TarInfo("golden-io.npz")
    ti.type = tarfile.LNKTYPE
    ti.linkname = "manifest.json"
    return _with_member(pub, d, ti, None)


def case_device(pub: Publisher, d: Path) -> Path:
    ti = tarfile.TarInfo("model.onnx")
    ti.type = tarfile.CHRTYPE
    ti.devmajor, ti.devminor = 1, 5  # /dev/zero
    return _with_member(pub, d, ti, None)


def _append_raw(pub: Publisher, d: Path, raw: bytes) -> Path:
    """A signed manifest and signature, then `raw` (headers built by hand) in place of
    the payload."""
    files = pub.files(M.affine(2.0))
    mb, sb, _ = signed_parts(pub, files, counter=5)
    out = d / "b"
    raw_tar(out, [reg("manifest.json", mb), reg("manifest.sig", sb)])
    data = out.read_bytes()
    end = data.rstrip(b"\0")
    end = end + b"\0" * (-len(end) % 512)
    out.write_bytes(end + raw)
    return out


def case_endless_member(pub: Publisher, d: Path) -> Path:
    # A header claiming an 8 GiB model.onnx (the largest ustar size): refused from the
    # header, nothing read.
    ti = tarfile.TarInfo("model.onnx")
    ti.size = 8**11 - 1
    return _append_raw(pub, d, ti.tobuf(format=tarfile.USTAR_FORMAT) + os.urandom(4096))


def case_pax_size(pub: Publisher, d: Path) -> Path:
    # The same claim spelled as a pax record (100 GiB): extension headers are refused.
    ti = tarfile.TarInfo("model.onnx")
    ti.size = 100 << 30
    return _append_raw(pub, d, ti.tobuf(format=tarfile.PAX_FORMAT) + os.urandom(4096))


def case_pax_flood(pub: Publisher, d: Path) -> Path:
    # CVE-2024-6232 class: one pax header whose records make tarfile's parser quadratic.
    # The reader refuses it from its 512-byte header without looking at the records.
    from tests.updates.test_tar_reader import pax_flood

    return _append_raw(pub, d, pax_flood(1 << 20))


def case_gnu_longname(pub: Publisher, d: Path) -> Path:
    ti = tarfile.TarInfo("m/" * 80 + "model.onnx")
    ti.size = 4
    return _append_raw(pub, d, ti.tobuf(format=tarfile.GNU_FORMAT) + b"abcd" + b"\0" * 508)


def case_oversized_bundle(pub: Publisher, d: Path) -> Path:
    return pub.bundle(
        d / "b", version="2.0.0", counter=5, model=M.affine(pad_bytes=3 * 1024 * 1024)
    )


def case_wrong_hardware(pub: Publisher, d: Path) -> Path:
    return pub.bundle(d / "b", version="2.0.0", counter=5, hardware_ids=["jetson-orin"])


def case_version_mismatch(pub: Publisher, d: Path) -> Path:
    # Issue #12 item 17: `models` would say 2.0.0 and the loops (and the PCR binding) 1.9.0.
    return pub.bundle(
        d / "b", version="2.0.0", counter=5, model_manifest={"name": "m1", "version": "1.9.0"}
    )


def case_unknown_model(pub: Publisher, d: Path) -> Path:
    return pub.bundle(d / "b", version="2.0.0", counter=5, name="other")


def case_manifest_not_first(pub: Publisher, d: Path) -> Path:
    files = pub.files(M.affine(2.0))
    mb, sb, _ = signed_parts(pub, files, counter=5)
    return raw_tar(
        d / "b",
        [reg("model.onnx", files["model.onnx"]), reg("manifest.json", mb), reg("manifest.sig", sb)],
    )


def case_fifo(pub: Publisher, d: Path) -> Path:
    p = d / "fifo.bundle"
    os.mkfifo(p)
    return p


CASES = {
    "tampered_model": (case_tampered_model, "file_hash"),
    "tampered_manifest": (case_tampered_manifest, "bad_signature"),
    "unsigned": (case_unsigned, "unsigned"),
    "empty_signatures": (case_empty_signatures, "unsigned"),
    "wrong_key": (case_wrong_key, "unknown_key"),
    "below_threshold": (case_below_threshold, "below_threshold"),
    "same_key_twice": (case_same_key_twice, "below_threshold"),
    "expired": (case_expired, "expired"),
    "counter_rollback": (case_counter_rollback, "counter_rollback"),
    "fast_forward": (case_fast_forward, "fast_forward"),
    "version_rollback": (case_version_rollback, "version_rollback"),
    "replay_same_version": (case_same_version, "replay"),
    "mix_and_match": (case_mix_and_match, "file_hash"),
    "missing_file": (case_missing_file, "file_missing"),
    "extra_file": (case_extra_file, "file_unexpected"),
    "path_traversal": (case_path_traversal, "unsafe_path"),
    "absolute_path": (case_absolute_path, "unsafe_path"),
    "symlink": (case_symlink, "link_member"),
    "hardlink": (case_hardlink, "link_member"),
    "device": (case_device, "special_member"),
    "endless_member": (case_endless_member, "file_too_large"),
    "pax_size": (case_pax_size, "tar_extension"),
    "pax_flood": (case_pax_flood, "tar_extension"),
    "gnu_longname": (case_gnu_longname, "tar_extension"),
    "oversized_bundle": (case_oversized_bundle, "too_large"),
    "fifo_endless": (case_fifo, "not_a_file"),
    "wrong_hardware": (case_wrong_hardware, "incompatible_hardware"),
    "unknown_model": (case_unknown_model, "unknown_model"),
    "version_mismatch": (case_version_mismatch, "version_mismatch"),
    "manifest_not_first": (case_manifest_not_first, "bundle_layout"),
}


async def _refused(h: Any, path: Path, reason: str) -> None:
    before_tree = sha_tree(h.store.dir("a"))
    before_runner = h.models.runner("m1")
    before_active = h.record().active
    with pytest.raises(CommandError) as ei:
        await h.updates.commands()["update"].handler({"path": str(path), "wait": "commit"}, ROOT)
    assert ei.value.code == reason, ei.value.message
    assert ei.value.message  # a human-readable why
    assert h.current() == "a"
    assert h.models.runner("m1") is before_runner
    assert h.record().active == before_active == "a"
    assert sha_tree(h.store.dir("a")) == before_tree
    assert not h.store.staging.exists()
    assert h.store.marker("b") is None
    st = h.updates.status()["updates"]
    last = (
        st["recent_rejections"][-1] if st["recent_rejections"] else st["models"][0]["last_failure"]
    )
    assert last["reason"] == reason


@pytest.mark.parametrize("case", sorted(CASES))
async def test_attack_refused(
    case: str, harness: Any, tmp_path: Path, publisher: Publisher
) -> None:
    make, reason = CASES[case]
    counter = tmp_path / "state" / "updates" / "security_counter"
    counter.parent.mkdir(parents=True)
    counter.write_text("5\n")
    (tmp_path / "in").mkdir()
    async with harness(updates={"bundle_max_mb": 2.0, "file_max_mb": 2.0}) as h:
        path = make(publisher, tmp_path / "in")
        await _refused(h, path, reason)
        assert (await h.updates.counter.read()) == 5


async def test_replay_of_installed_bundle(
    harness: Any, tmp_path: Path, publisher: Publisher
) -> None:
    async with harness() as h:
        b = publisher.bundle(tmp_path / "v2.bundle", version="2.0.0", counter=1)
        res = await h.updates.commands()["update"].handler({"path": str(b), "wait": "commit"}, ROOT)
        assert res["state"] == "COMMITTED"
        runner = h.models.runner("m1")
        tree = sha_tree(h.store.dir("b"))
        with pytest.raises(CommandError) as ei:
            await h.updates.commands()["update"].handler({"path": str(b), "wait": "commit"}, ROOT)
        assert ei.value.code == "replay"
        assert h.current() == "b" and h.models.runner("m1") is runner
        assert sha_tree(h.store.dir("b")) == tree
        assert h.store.marker("a") is not None  # the previous slot is still there


async def test_keyring_rollback_and_jump_refused(
    harness: Any, tmp_path: Path, publisher: Publisher
) -> None:
    async with harness() as h:
        pubs = [k.public_key() for k in publisher.keys]
        same = B.make_keyring(pubs, threshold=2, version=1, signers=publisher.keys)
        jump = B.make_keyring(pubs, threshold=2, version=3, signers=publisher.keys)
        for doc, reason in ((same, "keyring_rollback"), (jump, "keyring_version_jump")):
            p = tmp_path / f"keyring-{reason}.json"
            p.write_bytes(B.keyring_bytes(doc))
            with pytest.raises(CommandError) as ei:
                await h.updates.commands()["update"].handler({"path": str(p)}, ROOT)
            assert ei.value.code == reason
            assert h.updates.keyring.version == 1
