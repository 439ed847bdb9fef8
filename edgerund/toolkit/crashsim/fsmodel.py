"""Replay traced syscalls into file-system operations, and enumerate power-cut states.

Operations (`Op`) name inodes, not paths, so a write through a descriptor reaches the file
it was opened on whatever renames happened since. `Recorder` runs the syscalls of a trace
against a full model of the traced tree (every operation applied: the run as it happened)
to give each operation its inodes, descriptor offsets and data (sendfile/copy_file_range
data is read from the source file).

`crash_states` applies the POSIX persistence rules (see the package docstring). At every
crash point k (the first k operations issued) an operation is durable when a barrier
covering it returned before k: an fsync of its file (data) or of the directories holding
its entries (create, unlink, rename: both directories), or sync/syncfs. The states
generated at k, per ALICE's exploration: everything issued persisted; only the durable
part; each non-durable operation alone lost (the later ones persisted: reordering); each
non-durable operation alone persisted; each non-durable write torn at a block boundary.
States are identified by a key (the reachable tree and, per file, which writes made its
bytes), so equal states are checked once; `materialise` writes one into a directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgerund.toolkit.crashsim.trace import Call, Fd, Str, unhex

MARKER_DIR = "/__crashsim__/"
BLOCK = 4096

FILE, DIR, LINK = "file", "dir", "symlink"


@dataclass(frozen=True, slots=True)
class Op:
    """One file-system operation. kind: write | trunc | create | unlink | rename | fsync |
    syncall. `dirs` are the directory inodes whose fsync makes a namespace change durable."""

    kind: str
    ino: int = 0
    off: int = 0
    data: bytes = b""
    size: int = 0
    parent: int = 0
    name: str = ""
    parent2: int = 0
    name2: str = ""
    node: str = FILE  # create: file | dir | symlink (target in `name2`) | hardlink
    path: str = ""  # where it happened, for filtering and reports

    @property
    def is_barrier(self) -> bool:
        return self.kind in ("fsync", "syncall")

    @property
    def is_data(self) -> bool:
        return self.kind in ("write", "trunc")

    def dirs(self) -> tuple[int, ...]:
        if self.kind == "rename":
            return (self.parent, self.parent2)
        if self.kind in ("create", "unlink"):
            return (self.parent,)
        return ()


@dataclass
class Node:
    kind: str
    entries: dict[str, int] = field(default_factory=dict)
    target: str = ""


@dataclass
class _FdState:
    ino: int | None
    path: str
    offset: int = 0
    append: bool = False


@dataclass
class Snapshot:
    """A tree: inode table (dirs with entries, symlinks) and file contents."""

    nodes: dict[int, Node]
    data: dict[int, bytes]
    root: int = 1


def snapshot_dir(path: Path) -> Snapshot:
    """The initial state: what is on disk under `path` before the trace starts."""
    nodes: dict[int, Node] = {1: Node(DIR)}
    data: dict[int, bytes] = {}
    nxt = [1]

    def walk(d: Path, ino: int) -> None:
        for child in sorted(d.iterdir()):
            nxt[0] += 1
            c = nxt[0]
            if child.is_symlink():
                nodes[c] = Node(LINK, target=os.readlink(child))
            elif child.is_dir():
                nodes[c] = Node(DIR)
                walk(child, c)
            else:
                nodes[c] = Node(FILE)
                data[c] = child.read_bytes()
            nodes[ino].entries[child.name] = c

    walk(path, 1)
    return Snapshot(nodes, data)


class Recorder:
    """Turns the syscalls of a trace under `root` into `ops` (see the module docstring);
    `markers` lists (name, number of ops issued before it)."""

    def __init__(self, root: Path, initial: Snapshot) -> None:
        self.root = os.path.normpath(str(root))
        self.nodes: dict[int, Node] = {
            i: Node(n.kind, dict(n.entries), n.target) for i, n in initial.nodes.items()
        }
        self.content: dict[int, bytearray] = {i: bytearray(b) for i, b in initial.data.items()}
        self.next_ino = max(self.nodes) + 1
        self.ops: list[Op] = []
        self.markers: list[tuple[str, int]] = []
        self.tables: dict[int, dict[int, _FdState]] = {}  # tid -> its descriptor table
        self.skipped: list[str] = []

    # -- tree -------------------------------------------------------------------------------
    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")

    def _parts(self, path: str) -> list[str]:
        rel = path[len(self.root) :].strip("/")
        return [p for p in rel.split("/") if p] if rel else []

    def lookup(self, path: str) -> int | None:
        if not self._inside(path):
            return None
        ino = 1
        for part in self._parts(path):
            node = self.nodes.get(ino)
            if node is None or node.kind != DIR or part not in node.entries:
                return None
            ino = node.entries[part]
        return ino

    def _parent(self, path: str) -> tuple[int | None, str]:
        head, name = os.path.split(path)
        return self.lookup(head), name

    # -- descriptors ------------------------------------------------------------------------
    def _table(self, tid: int) -> dict[int, _FdState]:
        t = self.tables.get(tid)
        if t is None:
            t = self.tables[tid] = {}
        return t

    def _fd(self, tid: int, fd: Fd) -> _FdState | None:
        st = self._table(tid).get(fd.num)
        if st is not None and st.path == fd.path:
            return st
        if st is not None and st.ino is not None:
            return st  # renamed or unlinked since open: the descriptor still names the inode
        ino = self.lookup(os.path.normpath(fd.path.removesuffix(" (deleted)")))
        st = _FdState(ino, fd.path)
        self._table(tid)[fd.num] = st
        return st

    # -- helpers ------------------------------------------------------------------------------
    def _resolve(self, dirfd: object, p: bytes) -> str:
        s = p.decode("utf-8", "surrogateescape")
        if s.startswith("/") or not isinstance(dirfd, Fd):
            return os.path.normpath(s)
        return os.path.normpath(os.path.join(dirfd.path, s))

    def _emit(self, op: Op) -> None:
        self.ops.append(op)

    def _write(self, ino: int, off: int, data: bytes, path: str) -> None:
        if not data:
            return
        buf = self.content.setdefault(ino, bytearray())
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(data)] = data
        self._emit(Op("write", ino=ino, off=off, data=data, path=path))

    def _read_source(self, st: _FdState, off: int, n: int) -> bytes:
        if st.ino is not None and st.ino in self.content:
            return bytes(self.content[st.ino][off : off + n])
        with open(st.path, "rb") as fh:
            fh.seek(off)
            return fh.read(n)

    def _create(self, path: str, kind: str, target: str = "", ino: int | None = None) -> int:
        parent, name = self._parent(path)
        if parent is None:
            raise KeyError(f"create under an unknown directory: {path}")
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.nodes[ino] = Node(kind, target=target)
            if kind == FILE:
                self.content[ino] = bytearray()
        self.nodes[parent].entries[name] = ino
        self._emit(
            Op(
                "create",
                ino=ino,
                parent=parent,
                name=name,
                node=kind,
                name2=target,
                path=path,
            )
        )
        return ino

    # -- syscalls -------------------------------------------------------------------------------
    def feed(self, calls: Iterable[Call]) -> None:
        for c in calls:
            try:
                self._call(c)
            except (KeyError, OSError, IndexError) as exc:
                self.skipped.append(f"{c.seq} {c.name}: {exc}")

    def _call(self, c: Call) -> None:
        a = c.args
        n = c.name
        if n in ("clone", "clone3", "fork", "vfork"):
            if c.ret > 0:
                table = self._table(c.tid)
                share = any(isinstance(x, str) and "CLONE_FILES" in x for x in a)
                if share:
                    self.tables[c.ret] = table
                else:
                    self.tables[c.ret] = {
                        k: _FdState(v.ino, v.path, v.offset, v.append) for k, v in table.items()
                    }
            return
        if n in ("open", "openat", "creat"):
            if n == "openat":
                dirfd, p, flags = a[0], a[1], str(a[2])
            elif n == "open":
                dirfd, p, flags = None, a[0], str(a[1])
            else:
                dirfd, p, flags = None, a[0], "O_CREAT|O_WRONLY|O_TRUNC"
            assert isinstance(p, Str)
            path = self._resolve(dirfd, p.value)
            if c.ret < 0:
                if path.startswith(MARKER_DIR.rstrip("/")):
                    self.markers.append((path[len(MARKER_DIR) :], len(self.ops)))
                return
            real = os.path.normpath(c.ret_path) if c.ret_path else path
            ino = None
            if self._inside(real):
                ino = self.lookup(real)
                if ino is None and "O_CREAT" in flags:
                    ino = self._create(real, FILE)
                elif ino is not None and "O_TRUNC" in flags and self.nodes[ino].kind == FILE:
                    if self.content.get(ino):
                        self.content[ino] = bytearray()
                        self._emit(Op("trunc", ino=ino, size=0, path=real))
            self._table(c.tid)[c.ret] = _FdState(ino, real, 0, "O_APPEND" in flags)
            return
        if c.ret < 0:
            return
        if n == "close":
            if isinstance(a[0], Fd):
                self._table(c.tid).pop(a[0].num, None)
            return
        if n in ("dup", "dup2", "dup3") or (n == "fcntl" and "F_DUPFD" in str(a[1])):
            if isinstance(a[0], Fd):
                st = self._fd(c.tid, a[0])
                if st is not None:
                    self._table(c.tid)[c.ret] = st
            return
        if n == "fcntl":
            return
        if n in ("write", "pwrite64", "writev", "pwritev", "pwritev2"):
            fd = a[0]
            if not isinstance(fd, Fd):
                return
            st = self._fd(c.tid, fd)
            if st is None or st.ino is None or c.ret <= 0:
                return
            if n in ("writev", "pwritev", "pwritev2"):
                raw = str(a[1])
                data = b"".join(unhex(m) for m in re.findall(r'iov_base="([^"]*)"', raw))
            else:
                s = a[1]
                assert isinstance(s, Str)
                data = s.value
            data = data[: c.ret]
            if n in ("pwrite64", "pwritev", "pwritev2"):
                off = int(a[3]) if isinstance(a[3], int) else 0
                self._write(st.ino, off, data, st.path)
            else:
                off = len(self.content.get(st.ino, b"")) if st.append else st.offset
                self._write(st.ino, off, data, st.path)
                st.offset = off + len(data)
            return
        if n == "lseek":
            if isinstance(a[0], Fd):
                st = self._fd(c.tid, a[0])
                if st is not None:
                    st.offset = c.ret
            return
        if n in ("sendfile", "copy_file_range"):
            if n == "sendfile":
                out, src, offarg = a[0], a[1], str(a[2])
            else:
                src, offarg, out = a[0], str(a[1]), a[2]
            if not (isinstance(out, Fd) and isinstance(src, Fd)) or c.ret <= 0:
                return
            so, si = self._fd(c.tid, out), self._fd(c.tid, src)
            if so is None or si is None:
                return
            m = re.match(r"^\[(\d+)\]", offarg)
            if m:
                off_in = int(m.group(1))
            else:
                off_in = si.offset
                si.offset += c.ret
            data = self._read_source(si, off_in, c.ret)
            if so.ino is not None:
                self._write(so.ino, so.offset, data, so.path)
            so.offset += c.ret
            return
        if n in ("ftruncate", "truncate"):
            if n == "ftruncate" and isinstance(a[0], Fd):
                st = self._fd(c.tid, a[0])
                ino = st.ino if st else None
                path = a[0].path
            else:
                assert isinstance(a[0], Str)
                path = self._resolve(None, a[0].value)
                ino = self.lookup(path)
            if ino is None:
                return
            size = int(a[1]) if isinstance(a[1], int) else 0
            buf = self.content.setdefault(ino, bytearray())
            if len(buf) > size:
                del buf[size:]
            else:
                buf.extend(bytes(size - len(buf)))
            self._emit(Op("trunc", ino=ino, size=size, path=path))
            return
        if n in ("fsync", "fdatasync"):
            if isinstance(a[0], Fd):
                st = self._fd(c.tid, a[0])
                if st is not None and st.ino is not None:
                    self._emit(Op("fsync", ino=st.ino, path=st.path))
            return
        if n in ("sync", "syncfs"):
            self._emit(Op("syncall"))
            return
        if n in ("rename", "renameat", "renameat2"):
            if n == "rename":
                assert isinstance(a[0], Str) and isinstance(a[1], Str)
                src, dst = self._resolve(None, a[0].value), self._resolve(None, a[1].value)
            else:
                assert isinstance(a[1], Str) and isinstance(a[3], Str)
                src, dst = self._resolve(a[0], a[1].value), self._resolve(a[2], a[3].value)
            ino = self.lookup(src)
            if ino is None:
                if self._inside(dst):
                    self.skipped.append(f"{c.seq} rename from outside the root into {dst}")
                return
            sp, sn = self._parent(src)
            if not self._inside(dst):
                assert sp is not None
                del self.nodes[sp].entries[sn]
                self._emit(Op("unlink", ino=ino, parent=sp, name=sn, path=src))
                return
            dp, dn = self._parent(dst)
            assert sp is not None and dp is not None
            del self.nodes[sp].entries[sn]
            self.nodes[dp].entries[dn] = ino
            self._emit(
                Op(
                    "rename",
                    ino=ino,
                    parent=sp,
                    name=sn,
                    parent2=dp,
                    name2=dn,
                    path=f"{src} -> {dst}",
                )
            )
            return
        if n in ("unlink", "unlinkat", "rmdir"):
            if n == "unlinkat":
                assert isinstance(a[1], Str)
                path = self._resolve(a[0], a[1].value)
            else:
                assert isinstance(a[0], Str)
                path = self._resolve(None, a[0].value)
            ino = self.lookup(path)
            if ino is None or ino == 1:
                return
            parent, name = self._parent(path)
            assert parent is not None
            del self.nodes[parent].entries[name]
            self._emit(Op("unlink", ino=ino, parent=parent, name=name, path=path))
            return
        if n in ("mkdir", "mkdirat"):
            p = a[1] if n == "mkdirat" else a[0]
            assert isinstance(p, Str)
            path = self._resolve(a[0] if n == "mkdirat" else None, p.value)
            if self._inside(path) and path != self.root:
                self._create(path, DIR)
            return
        if n in ("symlink", "symlinkat"):
            assert isinstance(a[0], Str)
            target = a[0].value.decode("utf-8", "surrogateescape")
            p = a[2] if n == "symlinkat" else a[1]
            assert isinstance(p, Str)
            path = self._resolve(a[1] if n == "symlinkat" else None, p.value)
            if self._inside(path):
                self._create(path, LINK, target)
            return
        if n in ("link", "linkat"):
            if n == "link":
                assert isinstance(a[0], Str) and isinstance(a[1], Str)
                src, dst = self._resolve(None, a[0].value), self._resolve(None, a[1].value)
            else:
                assert isinstance(a[1], Str) and isinstance(a[3], Str)
                src, dst = self._resolve(a[0], a[1].value), self._resolve(a[2], a[3].value)
            ino = self.lookup(src)
            if ino is not None and self._inside(dst):
                self._create(dst, "hardlink", ino=ino)
            return


# --------------------------------------------------------------------------------------------
# Crash states


StateKey = tuple[tuple[str, str, object], ...]
Include = Callable[[int], int | None]  # op index -> bytes of it to keep (-1 all), None: lost


@dataclass(frozen=True, slots=True)
class CrashState:
    point: int  # number of operations issued before the power cut
    how: str  # which rule made it: prefix | durable | lost:<i> | only:<i> | torn:<i>@<n>
    key: StateKey


def durable_at(ops: list[Op]) -> list[int]:
    """For each op, the index of the barrier that makes it durable (len(ops) if none)."""
    n = len(ops)
    nxt: dict[int, int] = {}
    sync_all = n
    out = [n] * n
    for j in range(n - 1, -1, -1):
        op = ops[j]
        if op.kind == "fsync":
            out[j] = j
            nxt[op.ino] = j
            continue
        if op.kind == "syncall":
            out[j] = j
            sync_all = j
            continue
        if op.is_data:
            out[j] = min(nxt.get(op.ino, n), sync_all)
        else:
            out[j] = min(max(nxt.get(d, n) for d in op.dirs()), sync_all)
    return out


def filter_ops(
    ops: list[Op], markers: list[tuple[str, int]], keep: Callable[[Op], bool]
) -> tuple[list[Op], list[tuple[str, int]]]:
    """Keep the ops `keep` selects (and every barrier); marker positions follow."""
    new: list[Op] = []
    pos: list[int] = []
    for op in ops:
        pos.append(len(new))
        if op.is_barrier or keep(op):
            new.append(op)
    pos.append(len(new))
    return new, [(name, pos[at]) for name, at in markers]


def _replay(initial: Snapshot, ops: list[Op], include: Include, upto: int) -> StateKey:
    """The state after applying the ops `include` admits (returning the byte length to keep:
    None = skip, -1 = whole) among the first `upto`."""
    entries = {i: dict(nd.entries) for i, nd in initial.nodes.items() if nd.kind == DIR}
    kinds = {i: (nd.kind, nd.target) for i, nd in initial.nodes.items()}
    hist: dict[int, list[tuple[int, int]]] = {}
    for j in range(upto):
        op = ops[j]
        if op.is_barrier:
            continue
        keep = include(j)
        if keep is None:
            continue
        k = op.kind
        if k in ("write", "trunc"):
            hist.setdefault(op.ino, []).append((j, keep))
        elif k == "create":
            entries.setdefault(op.parent, {})[op.name] = op.ino
            if op.node != "hardlink":  # a hard link names an inode that exists already
                kinds[op.ino] = (op.node, op.name2)
                if op.node == DIR:
                    entries.setdefault(op.ino, {})
        elif k == "unlink":
            d = entries.setdefault(op.parent, {})
            if d.get(op.name) == op.ino:
                del d[op.name]
        elif k == "rename":
            s = entries.setdefault(op.parent, {})
            if s.get(op.name) != op.ino:
                continue  # its creation did not persist: the rename cannot have either
            del s[op.name]
            entries.setdefault(op.parent2, {})[op.name2] = op.ino
    out: list[tuple[str, str, object]] = []

    def walk(ino: int, prefix: str, depth: int) -> None:
        for name in sorted(entries.get(ino, {})):
            c = entries[ino][name]
            kind, target = kinds.get(c, (FILE, ""))
            path = f"{prefix}{name}"
            if kind == DIR:
                out.append((path, DIR, None))
                if depth < 64:
                    walk(c, path + "/", depth + 1)
            elif kind == LINK:
                out.append((path, LINK, target))
            else:
                out.append((path, FILE, (c, tuple(hist.get(c, ())))))

    walk(initial.root, "", 0)
    return tuple(out)


def _all(j: int) -> int | None:
    return -1


def _without(drop: set[int]) -> Include:
    def inc(j: int) -> int | None:
        return None if j in drop else -1

    return inc


def _only(i: int, nondurable: set[int]) -> Include:
    def inc(j: int) -> int | None:
        return -1 if (j == i or j not in nondurable) else None

    return inc


def _torn(i: int, cut: int) -> Include:
    def inc(j: int) -> int | None:
        return cut if j == i else -1

    return inc


def crash_states(
    initial: Snapshot, ops: list[Op], *, torn: bool = True, max_window: int = 48
) -> Iterator[CrashState]:
    """Every state the rules allow at every crash point (duplicates included; callers
    dedupe on `key`). `max_window` bounds the single-op variants at one point to the most
    recent non-durable ops."""
    dur = durable_at(ops)
    n = len(ops)
    for k in range(n + 1):
        nd = [j for j in range(k) if dur[j] >= k and not ops[j].is_barrier]
        ndset = set(nd)
        yield CrashState(k, "prefix", _replay(initial, ops, _all, k))
        if not nd:
            continue
        yield CrashState(k, "durable", _replay(initial, ops, _without(ndset), k))
        for i in nd[-max_window:]:
            yield CrashState(k, f"lost:{i}", _replay(initial, ops, _without({i}), k))
            if len(nd) > 1:
                yield CrashState(k, f"only:{i}", _replay(initial, ops, _only(i, ndset), k))
            op = ops[i]
            if torn and op.kind == "write" and len(op.data) > 1:
                for cut in _cuts(op.off, len(op.data)):
                    yield CrashState(k, f"torn:{i}@{cut}", _replay(initial, ops, _torn(i, cut), k))


def _cuts(off: int, length: int) -> list[int]:
    """Prefix lengths at block boundaries (at most three: first, middle, last)."""
    first = BLOCK - off % BLOCK
    cuts = list(range(first, length, BLOCK))
    if not cuts:
        return []
    pick = {cuts[0], cuts[len(cuts) // 2], cuts[-1]}
    return sorted(pick)


def file_bytes(
    initial: Snapshot, ops: list[Op], content: tuple[int, tuple[tuple[int, int], ...]]
) -> bytes:
    ino, hist = content
    buf = bytearray(initial.data.get(ino, b""))
    for j, keep in hist:
        op = ops[j]
        if op.kind == "trunc":
            if len(buf) > op.size:
                del buf[op.size :]
            else:
                buf.extend(bytes(op.size - len(buf)))
            continue
        data = op.data if keep < 0 else op.data[:keep]
        if len(buf) < op.off:
            buf.extend(bytes(op.off - len(buf)))
        buf[op.off : op.off + len(data)] = data
    return bytes(buf)


def materialise(initial: Snapshot, ops: list[Op], key: StateKey, dest: Path) -> None:
    """Write the state `key` under `dest` (which must exist and be empty)."""
    for path, kind, extra in key:
        p = dest / path
        if kind == DIR:
            p.mkdir(exist_ok=True)
        elif kind == LINK:
            assert isinstance(extra, str)
            os.symlink(extra, p)
        else:
            assert isinstance(extra, tuple)
            p.write_bytes(file_bytes(initial, ops, extra))
