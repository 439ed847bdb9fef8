"""The crash-state engine on hand-written traces: the POSIX persistence rules it applies
(pure: no strace, no daemon)."""

from __future__ import annotations

from pathlib import Path

from edgerund.toolkit.crashsim import fsmodel, trace
from edgerund.toolkit.crashsim.fsmodel import Snapshot


def _hex(s: str) -> str:
    return "".join(f"\\x{b:02x}" for b in s.encode())


def _fd(n: int, path: str) -> str:
    return f"{n}<{_hex(path)}>"


def _lines(root: str, *, fsync_dir: bool) -> list[str]:
    tmp, dst = f"{root}/.f.tmp", f"{root}/f"
    out = [
        f'10 openat(AT_FDCWD, "{_hex(tmp)}", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0644) = {_fd(3, tmp)}',
        f'10 write({_fd(3, tmp)}, "{_hex("new!" * 2048)}", 8192) = 8192',
        f"10 fsync({_fd(3, tmp)}) = 0",
        f"10 close({_fd(3, tmp)}) = 0",
        f'10 rename("{_hex(tmp)}", "{_hex(dst)}") = 0',
    ]
    if fsync_dir:
        out += [
            f'10 openat(AT_FDCWD, "{_hex(root)}", O_RDONLY|O_DIRECTORY) = {_fd(4, root)}',
            f"10 fsync({_fd(4, root)}) = 0",
        ]
    out.append(f'10 openat(AT_FDCWD, "{_hex("/__crashsim__/done")}", O_RDONLY) = -1 ENOENT (x)')
    return out


def _record(lines: list[str]) -> fsmodel.Recorder:
    root = "/r"
    initial = Snapshot({1: fsmodel.Node("dir", {"f": 2}), 2: fsmodel.Node("file")}, {2: b"old"})
    rec = fsmodel.Recorder(Path(root), initial)
    rec.feed(trace.parse(lines))
    assert not rec.skipped, rec.skipped
    return rec


def _contents(rec: fsmodel.Recorder, at_least: int) -> set[bytes]:
    initial = Snapshot({1: fsmodel.Node("dir", {"f": 2}), 2: fsmodel.Node("file")}, {2: b"old"})
    out = set()
    for st in fsmodel.crash_states(initial, rec.ops):
        if st.point < at_least:
            continue
        files = {p: extra for p, kind, extra in st.key if kind == "file"}
        assert isinstance(files["f"], tuple)
        out.add(fsmodel.file_bytes(initial, rec.ops, files["f"]))
    return out


def test_parse_decodes_hex_paths_data_and_resumed_calls() -> None:
    calls = list(
        trace.parse(
            [
                f'7 write({_fd(3, "/r/a b")}, "{_hex("hi")}", 2 <unfinished ...>',
                "8 close(5) = 0",
                "7 <... write resumed>)          = 2",
            ]
        )
    )
    assert [c.name for c in calls] == ["close", "write"]  # the write at its completion
    w = calls[1]
    assert w.args[0] == trace.Fd(3, "/r/a b") and w.args[1] == trace.Str(b"hi") and w.ret == 2


def test_rename_without_directory_fsync_may_be_lost_after_the_marker() -> None:
    rec = _record(_lines("/r", fsync_dir=False))
    done = dict(rec.markers)["done"]
    # After the last syscall the rename is still not durable: the old bytes may be seen.
    assert _contents(rec, done) == {b"old", b"new!" * 2048}


def test_fsync_of_the_directory_makes_the_rename_durable() -> None:
    rec = _record(_lines("/r", fsync_dir=True))
    done = dict(rec.markers)["done"]
    assert _contents(rec, done) == {b"new!" * 2048}
    # Before it, both; never a torn or empty file (the data was fsynced before the rename).
    assert _contents(rec, 0) == {b"old", b"new!" * 2048}


def test_unsynced_write_may_be_torn_at_block_boundaries() -> None:
    lines = [
        f'10 pwrite64({_fd(3, "/r/f")}, "{_hex("x" * 10000)}", 10000, 0) = 10000',
    ]
    rec = _record(lines)
    initial = Snapshot({1: fsmodel.Node("dir", {"f": 2}), 2: fsmodel.Node("file")}, {2: b""})
    seen = set()
    for st in fsmodel.crash_states(initial, rec.ops):
        extra = dict((p, e) for p, _, e in st.key)["f"]
        assert isinstance(extra, tuple)
        seen.add(len(fsmodel.file_bytes(initial, rec.ops, extra)))
    assert {0, 4096, 8192, 10000} <= seen
