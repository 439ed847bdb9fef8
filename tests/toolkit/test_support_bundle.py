"""The support bundle is private from the moment it exists (issue #12 item 13): it was
written 0644 (umask) and chmod-ed 0600 only at the end, so anyone could open it meanwhile."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerund.toolkit import support_bundle


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)  # the worst umask: anything created without a mode is 0666
    try:
        yield
    finally:
        os.umask(old)


def test_open_private_is_0600_at_creation(tmp_path: Path, umask_zero: None) -> None:
    p = tmp_path / "b.tar.gz"
    with support_bundle.open_private(p) as f:
        assert os.fstat(f.fileno()).st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        support_bundle.open_private(p)  # O_EXCL: never reuses a file someone prepared


def test_bundle_never_readable_by_others_while_written(
    tmp_path: Path, umask_zero: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "support.tar.gz"
    seen: list[int] = []
    real_addfile = tarfile.TarFile.addfile

    def spy(self: tarfile.TarFile, info: tarfile.TarInfo, fileobj: Any = None) -> None:
        seen.append(os.stat(out.with_name(out.name + ".part")).st_mode & 0o777)
        real_addfile(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", spy)
    support_bundle.write_bundle(out, {"a.json": b"{}", "b.txt": b"x"})
    assert seen == [0o600, 0o600], [oct(m) for m in seen]
    assert out.stat().st_mode & 0o777 == 0o600
    with tarfile.open(out) as tf:
        assert sorted(Path(m.name).name for m in tf.getmembers()) == ["a.json", "b.txt"]


def test_planted_symlink_at_the_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    out = tmp_path / "support.tar.gz"
    out.with_name(out.name + ".part").symlink_to(victim)
    support_bundle.write_bundle(out, {"a.json": b"{}"})
    assert victim.read_bytes() == b"keep me"
    assert tarfile.is_tarfile(out)
    assert not out.is_symlink()
