"""Sparkplug B messages from benchmarks/sparkplug_b.proto, with the real protobuf runtime.

There is no `protoc` here, so `load()` reads the .proto itself (the subset it uses:
proto2 `message` blocks, nested messages, `optional`/`repeated` scalar and message
fields, one level of `oneof`) into a `FileDescriptorProto` and asks the protobuf library
for the message classes. Encoding and decoding are then the library's own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).with_name("sparkplug_b.proto")
F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    "uint64": F.TYPE_UINT64,
    "uint32": F.TYPE_UINT32,
    "float": F.TYPE_FLOAT,
    "double": F.TYPE_DOUBLE,
    "bool": F.TYPE_BOOL,
    "string": F.TYPE_STRING,
    "bytes": F.TYPE_BYTES,
}
TOKEN = re.compile(r"[A-Za-z_][\w.]*|\d+|[{}=;]")


def _file_proto(text: str) -> descriptor_pb2.FileDescriptorProto:
    text = re.sub(r"//[^\n]*", "", text)
    toks = TOKEN.findall(text)
    fd = descriptor_pb2.FileDescriptorProto(name=PROTO.name, syntax="proto2")
    stack: list[Any] = []  # DescriptorProto being filled; a oneof index on top
    scope: list[str] = []
    oneof: int | None = None
    i = 0
    while i < len(toks):
        t = toks[i]
        if t == "syntax":
            i += 4  # syntax = "proto2" ; (the string is not a token)
            continue
        if t == "package":
            fd.package = toks[i + 1]
            scope = [fd.package]
            i += 3
        elif t == "message":
            msg = (stack[-1].nested_type if stack else fd.message_type).add(name=toks[i + 1])
            stack.append(msg)
            scope.append(toks[i + 1])
            i += 3
        elif t == "oneof":
            oneof = len(stack[-1].oneof_decl)
            stack[-1].oneof_decl.add(name=toks[i + 1])
            i += 3
        elif t == "}":
            if oneof is not None:
                oneof = None
            else:
                stack.pop()
                scope.pop()
            i += 1
        else:  # [label] type name = number ;
            label = F.LABEL_OPTIONAL
            if t in ("optional", "repeated", "required"):
                label = {"optional": F.LABEL_OPTIONAL, "repeated": F.LABEL_REPEATED}.get(
                    t, F.LABEL_REQUIRED
                )
                i += 1
            typ, name, number = toks[i], toks[i + 1], int(toks[i + 3])
            f = stack[-1].field.add(name=name, number=number, label=label)
            if typ in SCALARS:
                f.type = SCALARS[typ]
            else:  # a message declared in this scope
                f.type = F.TYPE_MESSAGE
                f.type_name = "." + ".".join([*scope, typ])
            if oneof is not None:
                f.oneof_index = oneof
            i += 5
    return fd


def load() -> Any:
    """The `Payload` message class (with `Payload.Metric`)."""
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(_file_proto(PROTO.read_text()))
    return message_factory.GetMessageClass(fd.message_types_by_name["Payload"])
