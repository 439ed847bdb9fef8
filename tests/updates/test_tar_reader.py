"""The bundle's tar reader (edgerund.updates.tarread) against crafted archives: everything
that is not a plain ustar regular file is refused from its header, in linear time, and
`tarfile` is never involved (CVE-2024-6232: a pax header made tarfile quadratic)."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgerund.errors import TrustError
from edgerund.publisher import build as B
from edgerund.updates import bundle as bundle_io
from edgerund.updates import tarread
from edgerund.updates.keyring import parse_keyring
from edgerund.updates.tarread import BLOCK, UstarReader
from edgerund.updates.trust import Device, Installed, Limits
from tests.updates import models as M
from tests.updates.support import Publisher

MB = 1 << 20


def header(
    name: bytes,
    size: int = 0,
    *,
    flag: bytes = b"0",
    magic: bytes = tarread.MAGIC,
    prefix: bytes = b"",
    linkname: bytes = b"",
    size_field: bytes | None = None,
    checksum: int | None = None,
) -> bytes:
    """A 512-byte ustar header built by hand (so the tests do not depend on tarfile)."""
    b = bytearray(BLOCK)
    b[0 : len(name)] = name
    b[100:108] = b"0000644\x00"
    b[108:116] = b"0000000\x00"
    b[116:124] = b"0000000\x00"
    b[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    b[136:148] = b"00000000000\x00"
    b[156:157] = flag
    b[157 : 157 + len(linkname)] = linkname
    b[257:265] = magic
    b[345 : 345 + len(prefix)] = prefix
    b[148:156] = b" " * 8
    cs = sum(b) if checksum is None else checksum
    b[148:156] = b"%06o\x00 " % cs
    return bytes(b)


def member(name: bytes, data: bytes, **kw: Any) -> bytes:
    return header(name, len(data), **kw) + data + bytes(-len(data) % BLOCK)


END = bytes(2 * BLOCK)


def pax_flood(n: int) -> bytes:
    """One pax extended header carrying `n` bytes of records (the CVE-2024-6232 shape),
    then a member it would apply to."""
    line = b" comment=" + b"a" * 200 + b"\n"
    rec = b"%d" % (len(line) + 3) + line
    body = rec * (n // len(rec) + 1)
    return member(b"././@PaxHeader", body, flag=b"x") + member(b"model.onnx", b"x")


def read_all(data: bytes, member_max: int = MB, max_members: int = 256) -> list[tuple[str, bytes]]:
    tr = UstarReader(
        io.BytesIO(data), len(data), member_max_bytes=member_max, max_members=max_members
    )
    out = []
    while (m := tr.next()) is not None:
        out.append((m.name, tr.read(m.size)))
    return out


def refused(data: bytes, code: str, **kw: Any) -> str:
    with pytest.raises(TrustError) as ei:
        read_all(data, **kw)
    assert ei.value.code == code, str(ei.value)
    return str(ei.value)


def forbid_tarfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, any use of tarfile (on the device's read path) fails the test."""

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("tarfile must not parse an unauthenticated bundle")

    monkeypatch.setattr(tarfile, "open", boom)
    monkeypatch.setattr(tarfile.TarFile, "__init__", boom)
    monkeypatch.setattr(tarfile.TarInfo, "frombuf", boom)


@pytest.fixture
def no_tarfile(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_tarfile(monkeypatch)


# -- accepted ----------------------------------------------------------------------------


def test_plain_members_round_trip() -> None:
    data = member(b"manifest.json", b"{}") + member(b"a/b.bin", b"z" * 700) + END
    assert read_all(data) == [("manifest.json", b"{}"), ("a/b.bin", b"z" * 700)]


def test_prefix_field_joins_long_names() -> None:
    data = member(b"model.onnx", b"1", prefix=b"d" * 120) + END
    assert read_all(data) == [("d" * 120 + "/model.onnx", b"1")]


def test_unread_member_data_is_skipped() -> None:
    data = member(b"one", b"1" * 1000) + member(b"two", b"2") + END
    tr = UstarReader(io.BytesIO(data), len(data), member_max_bytes=MB)
    assert tr.next() == tarread.Member("one", 1000)
    assert tr.read(10) == b"1" * 10
    assert tr.next() == tarread.Member("two", 1)
    assert tr.read(5) == b"2"  # never past the declared size
    assert tr.next() is None


def test_builder_emits_what_the_reader_accepts(tmp_path: Path) -> None:
    out = tmp_path / "b.tar"
    B.write_tar(out, [("manifest.json", b"{}"), ("x" * 130 + "/model.onnx", b"m")])
    assert read_all(out.read_bytes()) == [
        ("manifest.json", b"{}"),
        ("x" * 130 + "/model.onnx", b"m"),
    ]
    with pytest.raises(ValueError):  # too long for ustar: the builder refuses, no pax
        B.write_tar(tmp_path / "c.tar", [("y" * 300, b"")])


def test_shipped_reference_bundle_reads(no_tarfile: None) -> None:
    ref = Path(__file__).resolve().parents[2] / "models" / "reference.bundle"
    assert bundle_io.peek_model_name(ref, 256 * 1024) == "motor-ae"


# -- refused from the header -------------------------------------------------------------


def test_pax_flood_refused_fast_without_tarfile(no_tarfile: None) -> None:
    data = pax_flood(MB) + END
    assert len(data) > MB
    t0 = time.process_time()
    msg = refused(data, "tar_extension")
    cpu_ms = (time.process_time() - t0) * 1e3
    assert "pax extended header" in msg
    assert cpu_ms < 50, f"refusing 1 MB of pax records took {cpu_ms:.1f} ms of CPU"


@pytest.mark.parametrize(
    ("flag", "what"),
    [
        (b"x", "pax extended header"),
        (b"g", "pax global header"),
        (b"L", "GNU long name"),
        (b"K", "GNU long link name"),
    ],
)
def test_extension_headers_refused(flag: bytes, what: str) -> None:
    data = member(b"././@LongLink", b"model.onnx\x00", flag=flag) + END
    assert what in refused(data, "tar_extension")


def test_gnu_longname_from_tarfile_refused() -> None:
    ti = tarfile.TarInfo("m/" * 80 + "model.onnx")
    ti.size = 1
    data = ti.tobuf(format=tarfile.GNU_FORMAT) + b"1" + bytes(511) + END
    refused(data, "tar_extension")


@pytest.mark.parametrize(
    ("flag", "code"),
    [
        (b"1", "link_member"),
        (b"2", "link_member"),
        (b"3", "special_member"),
        (b"4", "special_member"),
        (b"5", "special_member"),
        (b"6", "special_member"),
        (b"7", "special_member"),
        (b"S", "special_member"),
        (b"Z", "special_member"),
    ],
)
def test_non_regular_members_refused(flag: bytes, code: str) -> None:
    data = header(b"model.onnx", flag=flag, linkname=b"/etc/shadow") + END
    refused(data, code)


def test_bad_checksum_refused() -> None:
    h = bytearray(member(b"model.onnx", b"1"))
    h[0:1] = b"M"  # changed after the checksum was computed
    assert "checksum" in refused(bytes(h) + END, "bundle_malformed")


def test_signed_checksum_is_not_accepted() -> None:
    good = header(b"\xe9", 0)  # a high byte: signed and unsigned sums differ
    signed = sum((c - 256 if c > 127 else c) for c in good[:148] + b" " * 8 + good[156:])
    refused(header(b"\xe9", 0, checksum=signed) + END, "bundle_malformed")


@pytest.mark.parametrize(
    "field",
    [
        b"\x80" + bytes(3) + (1 << 40).to_bytes(8, "big"),  # GNU base-256
        b"0000000009\x00\x00",
        b"-0000000001\x00",
        b"00000000001x",
    ],
)
def test_non_octal_size_refused(field: bytes) -> None:
    refused(header(b"model.onnx", size_field=field) + END, "bundle_malformed")


def test_gnu_magic_refused() -> None:
    refused(member(b"model.onnx", b"1", magic=b"ustar  \x00") + END, "bundle_malformed")


@pytest.mark.parametrize(
    "name",
    [
        b"/etc/passwd",
        b"../../etc/cron.d/evil",
        b"a/../../b",
        b"./model.onnx",
        b"a//b",
        b"a/b/",
        b"a\\b",
        b"model.onnx\x00/../../evil",  # data hidden after the NUL terminator
        b"mod\xc3\xa9l.onnx",
        b"model onnx",
        b"",
    ],
)
def test_unsafe_names_refused(name: bytes) -> None:
    refused(member(name, b"1") + END, "unsafe_path")


def test_nul_trick_in_prefix_refused() -> None:
    refused(member(b"model.onnx", b"1", prefix=b"ok\x00/etc") + END, "unsafe_path")


def test_oversize_member_refused_before_reading() -> None:
    # Claims 8 GiB but the file holds nothing: refused from the size field alone.
    data = header(b"model.onnx", 8**11 - 1) + END
    assert "8589934591" in refused(data, "file_too_large", member_max=MB)


def test_size_beyond_the_file_refused() -> None:
    data = header(b"model.onnx", 100_000) + b"x" * 1000
    refused(data, "bundle_truncated", member_max=MB)


def test_duplicate_member_refused() -> None:
    data = member(b"model.onnx", b"1") + member(b"model.onnx", b"2") + END
    refused(data, "duplicate_member")


def test_member_count_capped() -> None:
    data = b"".join(member(b"f%d" % i, b"") for i in range(5)) + END
    refused(data, "too_many_members", max_members=4)


def test_trailing_garbage_refused() -> None:
    refused(member(b"model.onnx", b"1") + END + b"MZ\x90\x00", "trailing_data")


def test_zero_padding_after_the_end_is_fine() -> None:
    assert read_all(member(b"model.onnx", b"1") + END + bytes(9216)) == [("model.onnx", b"1")]


def test_missing_end_block_refused() -> None:
    refused(member(b"model.onnx", b"1"), "bundle_truncated")


def test_short_header_refused() -> None:
    refused(member(b"model.onnx", b"1") + b"\x01" * 100, "bundle_truncated")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_only_ever_give_trust_errors(data: st.DataObject) -> None:
    base = bytearray(
        member(b"manifest.json", b'{"a": 1}') + member(b"model.onnx", b"m" * 600) + END
    )
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    try:
        read_all(bytes(base[:cut]))
    except TrustError:
        pass


# -- through read_bundle / peek_model_name ------------------------------------------------


@pytest.fixture(scope="module")
def pub() -> Publisher:
    return Publisher()


def _read(pub: Publisher, path: Path, tmp: Path) -> Any:
    staging = tmp / "staging"
    staging.mkdir(exist_ok=True)
    return bundle_io.read_bundle(
        path,
        staging,
        parse_keyring(B.keyring_bytes(pub.keyring_doc)),
        now=time.time(),
        device=Device("rpi4", "9.9.9", 21, ["m1"]),
        installed=Installed(counter=0, version=None),
        limits=Limits(4 * MB, 4 * MB, 16),
        manifest_max=256 * 1024,
    )


def test_genuine_bundle_without_tarfile(
    pub: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = pub.bundle(tmp_path / "ok.bundle", version="2.0.0", counter=1, model=M.affine(2.0))
    forbid_tarfile(monkeypatch)
    assert bundle_io.peek_model_name(b, 256 * 1024) == "m1"
    verdict, mbytes, _ = _read(pub, b, tmp_path)
    assert b"model_name" in mbytes
    assert verdict.manifest.version == "2.0.0"
    assert (tmp_path / "staging" / "model.onnx").read_bytes() == M.affine(2.0)


def test_pax_first_member_refused_by_peek(tmp_path: Path, no_tarfile: None) -> None:
    p = tmp_path / "pax.bundle"
    p.write_bytes(pax_flood(MB) + END)
    t0 = time.process_time()
    with pytest.raises(TrustError) as ei:
        bundle_io.peek_model_name(p, 256 * 1024)
    assert ei.value.code == "tar_extension"
    assert (time.process_time() - t0) * 1e3 < 50


def test_deeply_nested_manifest_refused(pub: Publisher, tmp_path: Path) -> None:
    p = tmp_path / "deep.bundle"
    p.write_bytes(member(b"manifest.json", b"[" * 100_000) + END)
    with pytest.raises(TrustError) as ei:
        bundle_io.peek_model_name(p, 256 * 1024)
    assert ei.value.code == "manifest_malformed"
    with pytest.raises(TrustError) as ei:
        _read(pub, p, tmp_path)
    assert ei.value.code == "manifest_malformed"
