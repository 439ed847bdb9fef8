"""A bundle is opened once and read once: the file the trust decision authenticated is the
file whose payload is extracted, even when the path is replaced in between."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from edgerund import __version__
from edgerund.component import Peer
from edgerund.updates import bundle as bundle_io
from edgerund.updates.bundle import BundleReader
from edgerund.updates.keyring import parse_keyring
from edgerund.updates.trust import Device, Installed, Limits, verify_manifest
from tests.updates import models as M
from tests.updates.support import Publisher, sha_tree

ROOT = Peer(pid=1, uid=0, gid=0, privileged=True)


async def test_an_update_opens_the_bundle_once(
    harness: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Path] = []
    real = bundle_io.open_bundle

    def counting(path: Path) -> Any:
        opened.append(path)
        return real(path)

    monkeypatch.setattr(bundle_io, "open_bundle", counting)
    async with harness() as h:
        b = h.pub.bundle(tmp_path / "v2.bundle", version="2.0.0", counter=1)
        res = await h.updates.commands()["update"].handler({"path": str(b), "wait": "commit"}, ROOT)
        assert res["state"] == "COMMITTED"
    assert opened == [b]


def test_path_replaced_after_the_head_changes_nothing(tmp_path: Path, publisher: Publisher) -> None:
    path = tmp_path / "b.bundle"
    publisher.bundle(path, version="2.0.0", counter=1, model=M.affine(2.0))
    other = publisher.bundle(tmp_path / "other", version="2.0.0", counter=1, model=M.affine(3.0))
    kr = parse_keyring(publisher.write_keyring(tmp_path / "kr.json").read_bytes())
    limits = Limits(bundle_max_bytes=1 << 24, file_max_bytes=1 << 24, max_counter_jump=16)
    staging = tmp_path / "staging"
    staging.mkdir()
    with BundleReader(path) as reader:
        head = reader.head(256 * 1024)
        verdict = verify_manifest(
            head.manifest_bytes,
            head.sig_bytes,
            kr,
            now=time.time(),
            device=Device("gw-test", __version__, 21, ["m1"]),
            installed=Installed(counter=0, version=None),
            limits=limits,
        )
        # Between authentication and extraction the path is swapped for another
        # (validly signed, different) bundle: the open file is still the first one.
        os.replace(other, path)
        reader.extract(staging, verdict.manifest, limits)
    want = {f.path: f.sha256 for f in verdict.manifest.files}
    assert sha_tree(staging) == want
    assert (staging / "model.onnx").read_bytes() == M.affine(2.0)  # not the swapped-in 3.0
