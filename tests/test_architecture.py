"""The dependency rules of docs/architecture.md, enforced by reading the imports.

Static (ast) so that a lazy import inside a function counts as much as one at the top:
- drivers never import the daemon (`edgerund`);
- production drivers never import the emulators (`drivers.emulated`);
- the daemon (everything reachable from `edgerund.daemon`) never imports the publisher's or
  the backend's code (`edgerund.publisher`, `edgerund.backend`);
- the pure cores import no I/O module (asyncio, socket, sqlite3, threading, subprocess, os,
  tarfile, serial, smbus2) and open no file.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The I/O-free cores: parsers, codecs, state machines, trust decisions, policies.
PURE_MODULES = (
    "edgerund/updates/trust.py",
    "edgerund/updates/manifest.py",
    "edgerund/updates/machine.py",
    "edgerund/updates/postdrift.py",
    "edgerund/updates/keyring.py",
    "edgerund/telemetry/codec.py",
    "edgerund/telemetry/aggregate.py",
    "edgerund/control/policy.py",
    "edgerund/control/histogram.py",
    "edgerund/identity/tpmstruct.py",
    "edgerund/identity/binding.py",
    "edgerund/inference/features.py",
    "edgerund/inference/drift.py",
    "edgerund/inference/profile.py",
    "edgerund/inference/calibration.py",
    "edgerund/inference/federated.py",
    "edgerund/inference/outlayer.py",
    "edgerund/hub/ring.py",
    "edgerund/hub/health.py",
    "edgerund/ports.py",
    "edgerund/telemetry/batcher.py",
    "edgerund/updates/tarread.py",
    "edgerund/updates/jsonguard.py",
    "edgerund/updates/probation.py",
    "edgerund/updates/abi.py",
    "edgerund/identity/nvbinding.py",
    "edgerund/remote.py",
    "edgerund/jsondepth.py",
    "drivers/edges.py",
    "edgerund/twin/auth.py",
    "edgerund/twin/reported.py",
    "edgerund/twin/desired.py",
    "edgerund/twin/bundlewire.py",
    "edgerund/twin/targets.py",
    "edgerund/config/diff.py",
    "edgerund/backend/rollout.py",
    "edgerund/backend/rolloutspec.py",
)
IO_MODULES = frozenset(
    {"asyncio", "socket", "sqlite3", "threading", "subprocess", "os", "tarfile", "serial", "smbus2"}
)
FILE_IO_CALLS = frozenset(
    {"open", "read_bytes", "read_text", "write_bytes", "write_text", "unlink", "mkdir"}
)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[str]:
    """Every module `path` imports, absolute, wherever the import statement stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = _module_name(path).split(".") if path.is_relative_to(ROOT) else ["outside"]
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            yield mod
            for alias in node.names:  # `from pkg import module` imports pkg.module
                yield f"{mod}.{alias.name}"


def _py_files(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for top in ("edgerund", "drivers") for p in _py_files(top)}


def _is_under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def test_drivers_never_import_the_daemon() -> None:
    bad = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in _py_files("drivers")
        for m in _imports(p)
        if _is_under(m, "edgerund")
    ]
    assert bad == []


def _module_strings(path: Path) -> Iterator[str]:
    """String constants naming a module: what `importlib.import_module` would load."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def test_production_drivers_never_import_emulators() -> None:
    bad = [
        f"{p.relative_to(ROOT)} loads {m}"
        for p in _py_files("drivers")
        if "emulated" not in p.relative_to(ROOT).parts
        for m in (*_imports(p), *_module_strings(p))
        if _is_under(m, "drivers.emulated")
    ]
    assert bad == []


def _closure(start: str, modules: dict[str, Path]) -> dict[str, str]:
    """Project modules reachable from `start`, each with the module that first imported it."""
    seen: dict[str, str] = {start: ""}
    todo = [start]
    while todo:
        cur = todo.pop()
        for m in _imports(modules[cur]):
            # `import a.b.c` also runs a/__init__ and a/b/__init__
            parts = m.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in modules and name not in seen:
                    seen[name] = cur
                    todo.append(name)
    return seen


def test_daemon_never_imports_publisher_or_backend() -> None:
    modules = _all_modules()
    reach = _closure("edgerund.main", modules)  # the process: main -> daemon -> ...
    assert "edgerund.daemon" in reach
    bad = [
        f"{m} (imported by {by})"
        for m, by in reach.items()
        if _is_under(m, "edgerund.publisher") or _is_under(m, "edgerund.backend")
    ]
    assert bad == []
    # the rule is not vacuous: the daemon does reach its own cores
    assert "edgerund.telemetry.codec" in reach


def test_the_closure_finds_a_lazy_import(tmp_path: Path) -> None:
    """The checker itself: an import inside a function body is found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from edgerund.backend import verify\n")
    assert "edgerund.backend.verify" in set(_imports(f))


@pytest.mark.parametrize("rel", PURE_MODULES)
def test_pure_cores_do_no_io(rel: str) -> None:
    path = ROOT / rel
    bad = sorted({m for m in _imports(path) if m.split(".")[0] in IO_MODULES})
    tree = ast.parse(path.read_text())
    calls = sorted(
        {
            (n.func.id if isinstance(n.func, ast.Name) else n.func.attr)
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and (
                (isinstance(n.func, ast.Name) and n.func.id in FILE_IO_CALLS)
                or (isinstance(n.func, ast.Attribute) and n.func.attr in FILE_IO_CALLS)
            )
        }
    )
    assert (bad, calls) == ([], [])
