"""Parse `strace -f -y -xx -s N` output into syscall records (pure: text in, records out).

With `-xx` every string argument and every `-y` path annotation is printed as `\\xNN`
escapes, so paths and written data decode exactly, whatever bytes they hold. A syscall
interrupted by another thread's line is printed as `name(args <unfinished ...>` and later
`<... name resumed>rest`; the two halves are joined and the record takes the position of
the resumed half (the moment the call returned: what matters for a barrier).

An argument is returned as one of: `Str` (a decoded string argument), `Fd` (a descriptor
with the path strace resolved for it), an int, or the raw token text (flags, NULL, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_HEX = re.compile(rb"\\x([0-9a-f]{2})")
_LINE = re.compile(r"^(\d+) +(.*)$")
_CALL = re.compile(r"^([a-z_0-9]+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. ([a-z_0-9]+) resumed>(.*)$")
_RET_SEP = re.compile(r"\) += ")


@dataclass(frozen=True, slots=True)
class Str:
    value: bytes


@dataclass(frozen=True, slots=True)
class Fd:
    num: int
    path: str


Arg = Str | Fd | int | str


@dataclass(frozen=True, slots=True)
class Call:
    """One completed syscall: `seq` is its position in the trace."""

    seq: int
    tid: int
    name: str
    args: tuple[Arg, ...]
    ret: int
    ret_path: str | None  # `-y` annotation of a returned descriptor
    extra: str  # text after the return value (errno name, offsets of sendfile)


def unhex(s: str) -> bytes:
    return _HEX.sub(lambda m: bytes([int(m.group(1), 16)]), s.encode("latin-1"))


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments (strings, [..] and {..} kept whole)."""
    out: list[str] = []
    depth = 0
    cur: list[str] = []
    in_str = False
    i = 0
    while i < len(text):
        c = text[i]
        if in_str:
            cur.append(c)
            if c == "\\":
                cur.append(text[i + 1])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            cur.append(c)
        elif c in "[{(":
            depth += 1
            cur.append(c)
        elif c in "]})":
            depth -= 1
            cur.append(c)
        elif c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if cur and "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


_FD = re.compile(r"^(-?\d+)<([^>]*)>$")


def _arg(tok: str) -> Arg:
    if tok.startswith('"'):
        end = tok.rfind('"')
        return Str(unhex(tok[1:end]))
    m = _FD.match(tok)
    if m:
        return Fd(int(m.group(1)), unhex(m.group(2)).decode("utf-8", "surrogateescape"))
    try:
        return int(tok, 0)
    except ValueError:
        return tok


def parse(lines: Iterable[str]) -> Iterator[Call]:
    pending: dict[tuple[int, str], str] = {}
    seq = 0
    for raw in lines:
        m = _LINE.match(raw.rstrip("\n"))
        if not m:
            continue
        tid, body = int(m.group(1)), m.group(2)
        if body.startswith(("+++", "---")):
            continue
        r = _RESUMED.match(body)
        if r:
            name = r.group(1)
            head = pending.pop((tid, name), None)
            if head is None:
                continue
            body = f"{name}({head}{r.group(2)}"
        elif body.endswith("<unfinished ...>"):
            c = _CALL.match(body)
            if c:
                pending[(tid, c.group(1))] = c.group(2)[: -len("<unfinished ...>")].rstrip()
            continue
        c = _CALL.match(body)
        if not c:
            continue
        name, rest = c.group(1), c.group(2)
        # The return value follows the LAST ") = " (strace pads it with spaces after a
        # resumed call; string arguments never hold one since -xx escapes every byte).
        ends = list(_RET_SEP.finditer(rest))
        if not ends:
            continue
        argtext, rettext = rest[: ends[-1].start()], rest[ends[-1].end() :].strip()
        rm = re.match(r"^(-?\d+|\?)(<([^>]*)>)?(.*)$", rettext)
        if not rm or rm.group(1) == "?":
            continue
        ret = int(rm.group(1))
        ret_path = unhex(rm.group(3)).decode("utf-8", "surrogateescape") if rm.group(3) else None
        args = tuple(_arg(t) for t in _split_args(argtext))
        seq += 1
        yield Call(seq, tid, name, args, ret, ret_path, rm.group(4).strip())


STRACE_SYSCALLS = (
    "open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,lseek,close,"
    "fsync,fdatasync,sync,syncfs,ftruncate,truncate,rename,renameat,renameat2,"
    "unlink,unlinkat,mkdir,mkdirat,rmdir,symlink,symlinkat,link,linkat,"
    "sendfile,copy_file_range,dup,dup2,dup3,fcntl,clone,clone3,fork,vfork"
)


def strace_argv(out: str, *, max_str: int = 8 << 20) -> list[str]:
    """The strace command prefix that records what `fsmodel` understands."""
    return [
        "strace",
        "-f",
        "-qq",
        "--seccomp-bpf",
        "-y",
        "-xx",
        "-s",
        str(max_str),
        "-e",
        f"trace={STRACE_SYSCALLS}",
        "-o",
        out,
    ]
