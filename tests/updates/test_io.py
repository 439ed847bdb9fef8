"""I/O paths: ENOSPC while staging, a corrupt state.json, MQTT chunked transfer, the inbox
directory, a keyring rotation at run time, and the `edgerund bundle` CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from edgerund.component import CommandError, Peer
from edgerund.publisher import build as B
from edgerund.publisher.cli import register
from edgerund.updates import fsutil
from tests.updates import models as M
from tests.updates.support import Publisher, sha_tree, wait_for

ROOT = Peer(pid=1, uid=0, gid=0, privileged=True)


def _try_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


async def test_enospc_during_staging(
    harness: Any, tmp_path: Path, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    mounted = _try_tmpfs(state, "1m")
    if not mounted:
        # No tmpfs: inject ENOSPC at the one place staged bytes reach the OS.
        real = fsutil.write_all
        budget = {"left": 512 * 1024}

        def write_all(fd: int, data: Any) -> None:
            budget["left"] -= len(data)
            if budget["left"] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd, data)

        monkeypatch.setattr(fsutil, "write_all", write_all)
    try:
        async with harness() as h:
            tree = sha_tree(h.store.dir("a"))
            big = publisher.bundle(
                tmp_path / "big.bundle",
                version="2.0.0",
                counter=1,
                model=M.affine(pad_bytes=2 * 1024 * 1024),
            )
            with pytest.raises(CommandError) as ei:
                await h.updates.commands()["update"].handler(
                    {"path": str(big), "wait": "commit"}, ROOT
                )
            assert ei.value.code == "no_space", ei.value.message
            assert h.current() == "a" and sha_tree(h.store.dir("a")) == tree
            assert h.models.runner("m1").version == "1.0.0"
            assert not h.store.staging.exists()  # the partial extraction was discarded
            if not mounted:
                monkeypatch.undo()
            small = publisher.bundle(tmp_path / "small.bundle", version="2.0.0", counter=1)
            res = await h.updates.commands()["update"].handler(
                {"path": str(small), "wait": "commit"}, ROOT
            )
            assert res["state"] == "COMMITTED"  # space came back: the next update works
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(state)], check=False)  # noqa: ASYNC221 - teardown


async def test_corrupt_state_json(harness: Any, tmp_path: Path, publisher: Publisher) -> None:
    async with harness() as h:
        b = publisher.bundle(tmp_path / "v2.bundle", version="2.0.0", counter=1)
        await h.updates.commands()["update"].handler({"path": str(b), "wait": "commit"}, ROOT)
        assert h.current() == "b"
    state = tmp_path / "state" / "models" / "m1" / "state.json"
    state.write_bytes(b'{"schema": 1, "model": "m1", "state": "PROB')  # torn write
    async with harness() as h:
        assert h.current() == "b"
        assert h.models.runner("m1").version == "2.0.0"
        info = h.updates.slot_info("m1")
        assert info["last_failure"]["reason"] == "state_corrupt"
        assert info["slots"]["a"]["version"] == "1.0.0"  # both slots recovered from markers
        assert (state.parent / "state.json.broken").exists()
        assert json.loads(state.read_bytes())["state"] == "IDLE"  # rewritten, readable


async def test_corrupt_active_slot_falls_back(
    harness: Any, tmp_path: Path, publisher: Publisher
) -> None:
    async with harness() as h:
        b = publisher.bundle(tmp_path / "v2.bundle", version="2.0.0", counter=1)
        await h.updates.commands()["update"].handler({"path": str(b), "wait": "commit"}, ROOT)
    model = tmp_path / "state" / "models" / "m1" / "b" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")  # bit rot in the active slot
    async with harness() as h:
        assert h.current() == "a"
        assert h.models.runner("m1").version == "1.0.0"
        info = h.updates.slot_info("m1")
        assert info["last_failure"]["reason"] == "slot_file_hash"
        assert info["quarantined"]["b"]["reason"] == "slot_file_hash"
        assert info["slots"]["b"] is None


async def test_mqtt_chunked_resumable_transfer(
    harness: Any, tmp_path: Path, publisher: Publisher
) -> None:
    b = publisher.bundle(
        tmp_path / "v2.bundle", version="2.0.0", counter=1, model=M.affine(pad_bytes=200_000)
    ).read_bytes()
    sha = hashlib.sha256(b).hexdigest()

    async def send(h: Any, hdr: dict[str, Any], data: bytes = b"") -> dict[str, Any]:
        out = await h.updates.mqtt_handler(json.dumps(hdr).encode() + b"\n" + data)
        return json.loads(out)

    chunk = 64 * 1024
    async with harness(updates={"mqtt_chunk_max_kb": 64, "bundle_max_mb": 1.0}) as h:
        r = await send(h, {"op": "begin", "id": "t1", "size": 5 << 20, "sha256": sha})
        assert r["ok"] is False and r["error"]["code"] == "too_large"
        r = await send(h, {"op": "begin", "id": "t1", "size": len(b), "sha256": sha})
        assert r == {"ok": True, "id": "t1", "next_offset": 0, "size": len(b)}
        r = await send(h, {"op": "chunk", "id": "t1", "offset": 0}, b[: chunk + 1])
        assert r["error"]["code"] == "chunk_too_large"
        await send(h, {"op": "chunk", "id": "t1", "offset": 0}, b[:chunk])
        r = await send(h, {"op": "chunk", "id": "t1", "offset": 0}, b[:chunk])  # retried duplicate
        assert r["next_offset"] == chunk
        assert h.updates.status()["updates"]["transfers"][0]["bytes_done"] == chunk
    # daemon restarted mid-transfer: resume where it stopped
    async with harness(updates={"mqtt_chunk_max_kb": 64, "bundle_max_mb": 1.0}) as h:
        r = await send(h, {"op": "begin", "id": "t1", "size": len(b), "sha256": sha})
        off = r["next_offset"]
        assert off == chunk
        r = await send(h, {"op": "commit", "id": "t1"})
        assert r["error"]["code"] == "incomplete"
        while off < len(b):
            r = await send(h, {"op": "chunk", "id": "t1", "offset": off}, b[off : off + chunk])
            off = r["next_offset"]
        r = await send(h, {"op": "commit", "id": "t1"})
        assert r == {"ok": True, "id": "t1", "accepted": True}
        await wait_for(lambda: h.updates.slot_info("m1")["state"] == "COMMITTED", 30)
        assert h.models.runner("m1").version == "2.0.0"
        # an endless sender is cut at the announced size
        r = await send(h, {"op": "begin", "id": "t2", "size": 10, "sha256": sha})
        r = await send(h, {"op": "chunk", "id": "t2", "offset": 0}, b"x" * 11)
        assert r["error"]["code"] == "too_large"
        assert not list((tmp_path / "state" / "updates" / "transfers").glob("t2*"))


async def test_inbox_and_keyring_rotation(
    harness: Any, tmp_path: Path, publisher: Publisher
) -> None:
    inbox = tmp_path / "usb"
    inbox.mkdir()
    new_keys = [B.Ed25519PrivateKey.generate() for _ in range(2)]
    async with harness(updates={"inbox_dir": str(inbox), "inbox_poll_ms": 50}) as h:
        # rotate to a keyring of two new keys (signed by 2 old + 2 new)
        doc = B.make_keyring(
            [k.public_key() for k in new_keys],
            threshold=2,
            version=2,
            signers=[*publisher.keys[:2], *new_keys],
        )
        (inbox / "keyring-v2.json").write_bytes(B.keyring_bytes(doc))
        await wait_for(lambda: h.updates.keyring.version == 2, 20)
        assert (tmp_path / "state" / "updates" / "keyring.json").exists()
        # a bundle signed by the old keys is now refused
        publisher.bundle(inbox / "old-keys.bundle", version="2.0.0", counter=1)
        await wait_for(
            lambda: any(
                r["reason"] == "unknown_key"
                for r in h.updates.status()["updates"]["recent_rejections"]
            ),
            20,
        )
        # ... one signed by the new ones is installed
        publisher.bundle(inbox / "new-keys.bundle", version="2.0.0", counter=1, signers=new_keys)
        await wait_for(lambda: h.updates.slot_info("m1")["state"] == "COMMITTED", 30)
        assert h.models.runner("m1").version == "2.0.0"
    async with harness(updates={"inbox_dir": str(inbox), "inbox_poll_ms": 50}) as h:
        assert h.updates.keyring.version == 2  # the rotation survives a restart


def test_cli_keygen_build_verify(tmp_path: Path) -> None:
    import argparse

    p = argparse.ArgumentParser()
    register(p.add_subparsers())

    def run(*argv: str) -> int:
        args = p.parse_args(["bundle", *argv])
        return int(args.func(args))

    d = tmp_path / "keys"
    assert run("keygen", "k1", "--out", str(d)) == 0
    assert run("keygen", "k2", "--out", str(d)) == 0
    assert run("keygen", "k1", "--out", str(d)) == 1  # never overwrites a key
    assert oct((d / "k1.key").stat().st_mode & 0o777) == "0o600"
    kr1 = tmp_path / "kr1.json"
    assert (
        run(
            "keyring",
            "create",
            "--pub",
            str(d / "k1.pub"),
            "--threshold",
            "1",
            "--sign",
            str(d / "k1.key"),
            "-o",
            str(kr1),
        )
        == 0
    )
    kr2 = tmp_path / "kr2.json"
    # rotation signed only by the new owner is refused
    assert (
        run(
            "keyring",
            "rotate",
            "--old",
            str(kr1),
            "--pub",
            str(d / "k2.pub"),
            "--threshold",
            "1",
            "--sign",
            str(d / "k2.key"),
            "-o",
            str(kr2),
        )
        == 1
    )
    assert (
        run(
            "keyring",
            "rotate",
            "--old",
            str(kr1),
            "--pub",
            str(d / "k2.pub"),
            "--threshold",
            "1",
            "--sign",
            str(d / "k1.key"),
            "--sign",
            str(d / "k2.key"),
            "-o",
            str(kr2),
        )
        == 0
    )
    md = tmp_path / "model"
    md.mkdir()
    (md / "model.onnx").write_bytes(M.affine())
    (md / "manifest.json").write_text(json.dumps({"name": "m1", "version": "1.2.0"}))
    out = tmp_path / "m1.bundle"
    assert run("build", "--model-dir", str(md), "--key", str(d / "k2.key"), "-o", str(out)) == 0
    assert run("verify", str(out), "--keyring", str(kr2)) == 0
    assert run("verify", str(out), "--keyring", str(kr1)) == 1
    assert run("verify", str(out), "--keyring", str(kr2), "--installed-version", "1.2.0") == 1


async def test_mqtt_header_nesting_is_a_bad_request(harness: Any) -> None:
    async with harness() as h:
        out = json.loads(await h.updates.mqtt_handler(b"[" * 20000 + b"\n"))
        assert out["ok"] is False and out["error"]["code"] == "bad_request"


async def test_manual_rollback_to_a_tampered_slot_is_refused(
    harness: Any, tmp_path: Path, publisher: Publisher
) -> None:
    async with harness() as h:
        b = publisher.bundle(tmp_path / "v2.bundle", version="2.0.0", counter=1)
        await h.updates.commands()["update"].handler({"path": str(b), "wait": "commit"}, ROOT)
        # Slot a (the packaged model) changed after start-up: never flipped to.
        (h.store.dir("a") / "model.onnx").write_bytes(b"not the packaged model")
        with pytest.raises(CommandError) as ei:
            await h.updates.commands()["rollback"].handler({"model": "m1"}, ROOT)
        assert ei.value.code == "slot_shipped_mismatch"
        assert h.current() == "b"
