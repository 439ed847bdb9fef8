"""Load the YAML config into typed objects, with errors that say where and what.

Theory of operation: the YAML text is *composed* into PyYAML's node tree (which keeps the
line of every key and value), checked for duplicate keys, constructed into plain Python
values, then converted by msgspec into the `Config` struct tree (edgerund/config/schema.py)
in one pass. msgspec reports the first violation as "... - at `$.sensors[0].address`"; we
parse that path, look the line up in the node tree, walk the schema to the struct at that
path (following tagged unions through the raw data) and rewrite the message as

    FILE:LINE: sensors[0].adress: unknown key 'adress'; did you mean 'address'?

After the typed pass, the checks in schema.CROSS_CHECKS return semantic problems (a loop
naming an unknown sensor) as (key.path, message) pairs that get the same FILE:LINE prefix.

Strings may reference `${NAME}` environment variables; `${EDGERUND_SHARE}` defaults to the
directory holding the shipped models (the checkout's top level, the installed wheel's
`<prefix>/share/edgerund`, or /usr/share/edgerund).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import yaml

from edgerund.config.schema import CROSS_CHECKS, Config
from edgerund.errors import ConfigError

PathKey = tuple[str | int, ...]
_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]|\[['\"]([^'\"]*)['\"]\]")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def share_dir() -> Path:
    """Where the shipped models live: $EDGERUND_SHARE; else the source checkout; else
    `<prefix>/share/edgerund` of the environment the package was installed into (the
    wheel carries the reference model and development keyring there as data files);
    else /usr/share/edgerund (the Debian package, whose venv has no share/)."""
    env = os.environ.get("EDGERUND_SHARE")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "models" / "reference").is_dir():
        return checkout
    installed = Path(sys.prefix) / "share" / "edgerund"
    if (installed / "models" / "reference").is_dir():
        return installed
    return Path("/usr/share/edgerund")


def simulate_config_path() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "simulate.yaml"


# --------------------------------------------------------------------------- YAML + lines


class _Doc:
    """Constructed data plus the line of every key/value path."""

    def __init__(self, data: Any, lines: dict[PathKey, int]) -> None:
        self.data = data
        self.lines = lines

    def line_of(self, path: PathKey) -> int | None:
        # The exact path, else the nearest ancestor that has a line.
        for n in range(len(path), -1, -1):
            line = self.lines.get(path[:n])
            if line is not None:
                return line
        return None


def _walk(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], file: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = _dotted((*path, key))
                raise ConfigError(
                    f"duplicate key '{key}' (first given on line {seen[key]})",
                    file=file,
                    line=line,
                    path=dotted,
                )
            seen[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, file)


# libyaml's parser when PyYAML was built with it (Debian's python3-yaml is): the same
# nodes, marks and errors, ~10x faster than the pure-Python one (~80 ms of start-up for the
# simulated config on a 2-vCPU VM).
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: str, file: str) -> _Doc:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(
                "the file is empty; expected a mapping with at least 'gateway'", file=file
            )
        lines: dict[PathKey, int] = {}
        _walk(node, (), lines, file)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"malformed YAML: {what}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", file=file) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of sections at the top level, got {type(data).__name__}",
            file=file,
            line=1,
        )
    return _Doc(data, lines)


def _expand_env(value: Any) -> Any:
    if isinstance(value, str) and "${" in value:

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name == "EDGERUND_SHARE" and name not in os.environ:
                return str(share_dir())
            got = os.environ.get(name)
            if got is None:
                if default is None:
                    raise KeyError(name)
                return default
            return got

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


# --------------------------------------------------------------------------- messages


def _dotted(path: PathKey) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _parse_msgspec_path(text: str) -> PathKey:
    return tuple(
        int(m.group(2)) if m.group(2) is not None else (m.group(1) or m.group(3))
        for m in _PATH_PART.finditer(text)
    )


def _struct_fields(tp: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(tp)
    return {f.name: hints.get(f.name, Any) for f in msgspec.structs.fields(tp)}


def _union_members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return list(typing.get_args(tp))
    return [tp]


def _tagged(members: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in members:
        if isinstance(m, type) and issubclass(m, msgspec.Struct):
            info = msgspec.inspect.type_info(m)
            tag = getattr(info, "tag", None)
            if tag is not None:
                out[str(tag)] = m
    return out


def _tag_field(struct_type: Any) -> str:
    info: Any = msgspec.inspect.type_info(struct_type)
    return str(info.tag_field)


def _resolve(tp: Any, path: PathKey, data: Any) -> Any:
    """The schema type found at `path`, following the raw data through tagged unions."""
    for part in path:
        members = [m for m in _union_members(tp) if m is not type(None)]
        tagged = _tagged(members)
        if tagged and isinstance(data, dict):
            tag_field = _tag_field(next(iter(tagged.values())))
            tp = tagged.get(str(data.get(tag_field)), members[0])
        elif len(members) == 1:
            tp = members[0]
        origin = typing.get_origin(tp)
        if isinstance(part, int) and origin in (list, tuple, set, frozenset):
            tp = typing.get_args(tp)[0]
            data = data[part] if isinstance(data, list) and part < len(data) else None
        elif isinstance(part, str) and isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            tp = _struct_fields(tp).get(part, Any)
            data = data.get(part) if isinstance(data, dict) else None
        elif isinstance(part, str) and origin is dict:
            tp = typing.get_args(tp)[1]
            data = data.get(part) if isinstance(data, dict) else None
        else:
            return Any
    members = [m for m in _union_members(tp) if m is not type(None)]
    tagged = _tagged(members)
    if tagged and isinstance(data, dict):
        tag_field = _tag_field(next(iter(tagged.values())))
        return tagged.get(str(data.get(tag_field)), tp)
    return tp


def _get(data: Any, path: PathKey) -> Any:
    for part in path:
        if isinstance(part, int) and isinstance(data, list) and part < len(data):
            data = data[part]
        elif isinstance(part, str) and isinstance(data, dict):
            data = data.get(part)
        else:
            return None
    return data


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _explain(exc: msgspec.ValidationError, doc: _Doc, file: str) -> ConfigError:
    text = str(exc)
    m = _MSGSPEC_PATH.search(text)
    path: PathKey = _parse_msgspec_path(m.group("path")) if m else ()
    core = text[: m.start()] if m else text
    here = _get(doc.data, path)

    unknown = re.match(r"Object contains unknown field `(.+)`", core)
    if unknown:
        key = unknown.group(1)
        tp = _resolve(Config, path, doc.data)
        known = (
            list(_struct_fields(tp))
            if isinstance(tp, type) and issubclass(tp, msgspec.Struct)
            else []
        )
        hint = _suggest(key, known)
        if not hint and known:
            hint = f"; expected one of: {', '.join(known)}"
        full = (*path, key)
        return ConfigError(
            f"unknown key '{key}'{hint}", file=file, line=doc.line_of(full), path=_dotted(full)
        )

    missing = re.match(r"Object missing required field `(.+)`", core)
    if missing:
        key = missing.group(1)
        where = _dotted(path) or "top level"
        return ConfigError(
            f"missing required key '{key}' in {where}",
            file=file,
            line=doc.line_of(path) or 1,
            path=_dotted((*path, key)),
        )

    enum = re.match(r"Invalid enum value (.+)", core)
    if enum:
        tp = _resolve(Config, path, doc.data)
        choices = (
            [str(a) for a in typing.get_args(tp)] if typing.get_origin(tp) is typing.Literal else []
        )
        hint = _suggest(str(here), choices)
        expected = f"; expected one of: {', '.join(choices)}" if choices else ""
        return ConfigError(
            f"invalid value {enum.group(1)}{hint}{expected}",
            file=file,
            line=doc.line_of(path),
            path=_dotted(path),
        )

    if core.startswith("Invalid value") and path and path[-1] in ("driver",):
        tagged = _tagged(_union_members(_resolve(Config, path[:-1], None)))
        if not tagged:
            parent_tp = _resolve(Config, path[:-2], doc.data) if len(path) > 1 else Any
            args = typing.get_args(parent_tp)
            tagged = _tagged(_union_members(args[0])) if args else {}
        driver_names = sorted(tagged)
        hint = _suggest(str(here), driver_names)
        listing = f"; known drivers: {', '.join(driver_names)}" if driver_names else ""
        return ConfigError(
            f"unknown driver '{here}'{hint}{listing}",
            file=file,
            line=doc.line_of(path),
            path=_dotted(path),
        )

    mismatch = re.match(r"Expected `(.+?)`, got `(.+?)`", core)
    if mismatch:
        type_names = {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "array": "a list",
            "object": "a mapping",
            "null": "nothing",
        }

        def nice(t: str) -> str:
            return " or ".join(type_names.get(p.strip(), p.strip()) for p in t.split("|"))

        got = nice(mismatch.group(2)) + (f" {here!r}" if here is not None else "")
        return ConfigError(
            f"expected {nice(mismatch.group(1))}, got {got}",
            file=file,
            line=doc.line_of(path),
            path=_dotted(path),
        )

    return ConfigError(
        core[:1].lower() + core[1:] + (f" (got {here!r})" if here is not None else ""),
        file=file,
        line=doc.line_of(path),
        path=_dotted(path),
    )


# --------------------------------------------------------------------------- public


def parse_config(
    text: str,
    file: str = "<config>",
    *,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Config:
    """Validate config text. Raises ConfigError with FILE:LINE: key.path: message.

    `transform` changes the parsed data before validation (a desired-state patch merged
    over the file): the text is parsed once, in C, and an error in a key the file has still
    names the file's line (a key only the patch sets names its nearest ancestor's)."""
    doc = _parse_yaml(text, file)
    if transform is not None:
        doc = _Doc(transform(doc.data), doc.lines)
    try:
        data = _expand_env(doc.data)
    except KeyError as exc:
        raise ConfigError(
            f"environment variable ${{{exc.args[0]}}} is not set and has no "
            "default (write ${NAME:-default})",
            file=file,
        ) from None
    try:
        cfg = msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise _explain(exc, doc, file) from None
    problems: list[tuple[str, str]] = []
    for check in CROSS_CHECKS:
        problems.extend(check(cfg))
    if problems:
        errors = [
            ConfigError(msg, file=file, line=doc.line_of(_parse_msgspec_path("." + p)), path=p)
            for p, msg in problems
        ]
        first = errors[0]
        if len(errors) > 1:
            first.args = ("\n".join(str(e) for e in errors),)
        raise first
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at `path`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file; create it or pass -c/--config FILE", file=str(p)) from None
    except PermissionError:
        raise ConfigError(
            "permission denied reading the config (run as root or a member of the edgerund group)",
            file=str(p),
        ) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a YAML file", file=str(p)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=str(p)
        ) from None
    return parse_config(text, str(p))
