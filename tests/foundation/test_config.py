"""Config loading: every bad config gets FILE:LINE: key.path: message, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgerund.config.loader import load_config, parse_config
from edgerund.errors import ConfigError

MIN = "gateway:\n  id: gw1\n"

# (name, yaml text, expected line, fragments that must all appear in the message)
BAD = [
    ("malformed yaml", "gateway:\n  id: [gw1\n", 3, ["malformed YAML"]),
    ("tab indentation", "gateway:\n\tid: gw1\n", 2, ["malformed YAML"]),
    ("top level list", "- gateway\n", 1, ["expected a mapping of sections"]),
    ("missing gateway", "logging:\n  level: info\n", 1, ["missing required key 'gateway'"]),
    ("missing gateway id", "gateway:\n  site: s\n", 1, ["gateway.id", "missing required key 'id'"]),
    (
        "wrong type",
        "gateway:\n  id: 12\n",
        2,
        ["gateway.id", "expected a string", "got an integer 12"],
    ),
    (
        "typo in key",
        MIN + "  sitee: lab\n",
        3,
        ["gateway.sitee", "unknown key 'sitee'", "did you mean 'site'?"],
    ),
    ("typo in section", MIN + "loging:\n  level: info\n", 3, ["loging", "did you mean 'logging'?"]),
    (
        "unknown key without near match",
        MIN + "zzz: 1\n",
        3,
        ["unknown key 'zzz'", "expected one of:", "gateway"],
    ),
    (
        "bad enum",
        MIN + "logging:\n  level: loud\n",
        4,
        ["logging.level", "invalid value 'loud'", "debug, info, warning, error"],
    ),
    ("enum near match", MIN + "logging:\n  level: warn\n", 4, ["did you mean 'warning'?"]),
    (
        "string for number",
        MIN + "diag:\n  max_request_bytes: lots\n",
        4,
        ["diag.max_request_bytes", "expected an integer", "'lots'"],
    ),
    ("duplicate key", MIN + "  id: gw2\n", 3, ["duplicate key 'id'", "line 2"]),
    (
        "cross check topic-safe id",
        "gateway:\n  id: gw/1\n",
        2,
        ["gateway.id", "MQTT topics", "'gw/1'"],
    ),
    (
        "relative state dir",
        MIN + "paths:\n  state_dir: state\n",
        4,
        ["paths.state_dir", "absolute path"],
    ),
    (
        "bool for string",
        MIN + "paths:\n  state_dir: yes\n",
        4,
        ["paths.state_dir", "expected a string", "true or false"],
    ),
    (
        "unset env var",
        MIN + "paths:\n  state_dir: ${EDGERUND_NOPE_XYZ}\n",
        None,
        ["EDGERUND_NOPE_XYZ", "not set"],
    ),
    ("empty file", "", None, ["empty"]),
]


@pytest.mark.parametrize("name,text,line,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_config_messages(name: str, text: str, line: int | None, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/edgerund/edgerund.yaml")
    msg = str(info.value)
    prefix = "/etc/edgerund/edgerund.yaml:" + (f"{line}:" if line else "")
    assert msg.startswith(prefix), msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_minimal_config_defaults() -> None:
    cfg = parse_config(MIN)
    assert cfg.gateway.id == "gw1"
    assert cfg.paths.state_dir == "/var/lib/edgerund"
    assert cfg.diag.socket == "/run/edgerund/diag.sock"
    assert cfg.sensors == [] and cfg.loops == []


def test_int_accepted_for_float_and_env_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERUND_TEST_DIR", "/srv/x")
    cfg = parse_config(
        MIN + "daemon:\n  watchdog_lag_limit_ms: 100\n"
        "paths:\n  state_dir: ${EDGERUND_TEST_DIR}/state\n"
        "  run_dir: ${EDGERUND_UNSET_XYZ:-/run/y}\n"
    )
    assert cfg.daemon.watchdog_lag_limit_ms == 100.0
    assert cfg.paths.state_dir == "/srv/x/state"
    assert cfg.paths.run_dir == "/run/y"


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"gateway:\n  id: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MIN)
    r = _check_config(good)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(MIN + "  sitee: x\n")
    r = _check_config(bad)
    assert r.returncode == 2
    assert r.stderr.strip() == f"{bad}:3: gateway.sitee: unknown key 'sitee'; did you mean 'site'?"
    assert "Traceback" not in r.stderr

    r = _check_config(tmp_path / "missing.yaml")
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_shipped_simulate_config_is_valid() -> None:
    from edgerund.config.loader import simulate_config_path

    path = simulate_config_path()
    if not path.exists():
        pytest.fail(f"the shipped simulated config {path} is missing")
    cfg = load_config(path)
    assert cfg.simulation.enabled
    assert cfg.sensors, "the simulated config should configure sensors"


# -- the table of sections ---------------------------------------------------------------

SECTION_MODULES = (
    "edgerund/config/foundation.py",
    "edgerund/hub/config.py",
    "edgerund/control/config.py",
    "edgerund/telemetry/config.py",
    "edgerund/identity/config.py",
    "edgerund/inference/config.py",
    "edgerund/updates/config.py",
)


@pytest.mark.parametrize("rel", SECTION_MODULES)
def test_section_modules_never_import_the_root_schema(rel: str) -> None:
    """Dependencies run one way: schema.py lists the sections, they do not look back
    (not even under TYPE_CHECKING), so there is no import cycle to break."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[2] / rel).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not {m for m in imported if m.startswith("edgerund.config.schema")}
    assert not {m for m in imported if m.startswith("edgerund.config.loader")}


def test_every_section_with_cross_field_checks_is_in_the_table() -> None:
    import importlib

    from edgerund.config.schema import CROSS_CHECKS

    for rel in SECTION_MODULES:
        mod = importlib.import_module(rel.removesuffix(".py").replace("/", "."))
        assert mod.cross_check in CROSS_CHECKS, rel


def test_problems_of_several_sections_are_reported_in_table_order(tmp_path: Path) -> None:
    # one problem for the foundation (first row), the loops (fourth) and the uplink (last)
    text = (
        "gateway:\n  id: gw1\n"
        "diag:\n  max_request_bytes: 10\n"
        "loops:\n  - id: l1\n    fallback: [{sensor: nope, channel: x, above: 1}]\n"
        "uplink:\n  port: 0\n"
    )
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "x.yaml")
    lines = str(ei.value).splitlines()
    assert lines[0] == "x.yaml:4: diag.max_request_bytes: expected at least 1024, got 10"
    assert lines[1].startswith("x.yaml:7: loops[0].fallback[0].sensor: unknown sensor 'nope'")
    assert lines[2] == "x.yaml:9: uplink.port: expected 1..65535, got 0"


def test_emulated_actuator_parses_everywhere_but_is_built_only_once_registered() -> None:
    """Production code never loads drivers.emulated: the config schema knows the emulated
    actuator's struct (drivers/simulation.py), the registry has its factory only after the
    root registers it. A fresh interpreter, since registration lasts for the process."""
    code = """
import sys
from edgerund.config.loader import parse_config
from drivers.registry import actuator_drivers
cfg = parse_config('''
gateway: {id: gw1}
loops:
  - id: l1
    fallback: [{sensor: s, channel: x, above: 1}]
    actuator: {driver: emulated, name: relay}
sensors: [{id: s, driver: bme280}]
''')
assert type(cfg.loops[0].actuator).__name__ == "EmulatedActuatorConfig"
assert "emulated" not in actuator_drivers()
assert not [m for m in sys.modules if m.startswith("drivers.emulated")], "loaded emulators"
from drivers.emulated import register_drivers
register_drivers()
register_drivers()  # idempotent
assert actuator_drivers()["emulated"].config_type is type(cfg.loops[0].actuator)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_only_simulation_only_structs_may_be_registered() -> None:
    from drivers.registry import actuator_drivers, register_actuator

    gpio = actuator_drivers()["gpio"]
    with pytest.raises(ValueError, match=r"drivers/simulation\.py"):
        register_actuator(gpio)
