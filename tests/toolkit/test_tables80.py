"""Every human table of edgerunctl fits 80 columns (issue #17), against the simulated
daemon, with the output piped (as in `edgerunctl sensors | less`) and COLUMNS=80."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from edgerund.ctl.render import fit_widths, sensors_rows
from tests.helpers.daemon import DaemonProcess, simulated

CTL = [sys.executable, "-m", "edgerund.ctl"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = simulated(tmp_path_factory.mktemp("sim80"))
    with d:
        d.wait_ready(60)
        time.sleep(2.0)
        yield d


def ctl(d: DaemonProcess, *args: str, columns: int = 80) -> str:
    env = {**os.environ, "COLUMNS": str(columns)}
    env.pop("LINES", None)
    r = subprocess.run(
        [*CTL, "--socket", d.socket_path, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_fit_widths_shrinks_the_widest_first() -> None:
    assert fit_widths([10, 5, 60], [2, 5, 10], 80) == [10, 5, 60]  # fits: unchanged
    w = fit_widths([10, 5, 90], [2, 5, 10], 80)
    assert w == [10, 5, 61] and sum(w) + 2 * 2 == 80
    w = fit_widths([30, 30, 30], [4, 4, 4], 50)
    assert sum(w) + 4 <= 50 and max(w) - min(w) <= 1  # evenly, widest first
    w = fit_widths([20] * 10, [10] * 10, 80)  # headers alone do not fit: cut below them
    assert sum(w) + 18 <= 80 and min(w) >= 3


def test_sensors_rows_one_main_value() -> None:
    rows = sensors_rows(
        [{"id": "a", "value": "25.9 °C, 1014 hPa, 40 %RH", "read_errors": 1, "timeouts": 2}]
    )
    assert rows[0]["value"] == "25.9 °C +2" and rows[0]["errors"] == 3


@pytest.mark.parametrize(
    "cmd",
    [
        ("sensors",),
        ("status",),
        ("models",),
        ("loops",),
        ("telemetry",),
        ("identity",),
        ("help",),
        ("i2c-scan", "1"),
    ],
)
def test_no_line_exceeds_80_columns(sim: DaemonProcess, cmd: tuple[str, ...]) -> None:
    out = ctl(sim, *cmd)
    assert out.strip()
    too_long = [ln for ln in out.splitlines() if len(ln) > 80]
    assert not too_long, "\n".join(too_long)


def test_sensors_is_one_line_per_sensor_and_wide_shows_every_channel(sim: DaemonProcess) -> None:
    sensors = json.loads(ctl(sim, "--json", "sensors"))
    out = ctl(sim, "sensors")
    lines = out.rstrip("\n").splitlines()
    assert lines[0] == "sensors" and lines[1].split()[:3] == ["id", "driver", "state"]
    assert len(lines) == 2 + len(sensors)  # no cell wrapped onto a second line
    for s, line in zip(sensors, lines[2:], strict=True):
        assert line.startswith(s["id"][:8])
    multi = next(s for s in sensors if s["value"] and s["value"].count(",") >= 2)
    row = next(ln for ln in lines if ln.startswith(multi["id"] + " "))
    assert f"+{multi['value'].count(',')}" in row
    wide = ctl(sim, "sensors", "--wide")
    wrow = next(ln for ln in wide.splitlines() if ln.startswith(multi["id"] + " "))
    units = [part.split()[-1] for part in multi["value"].split(", ")]
    assert wrow.count(",") == len(units) - 1 and all(u in wrow for u in units)  # uncut
    assert "where" in wide.splitlines()[1] and "overruns" in wide.splitlines()[1]


def test_loop_block_wraps_long_reasons_under_the_value_column() -> None:
    from edgerund.control.render import format_loop

    reason = "model motor-ae: fault: bad input: timestamps: gap of 51.8 ms between samples " * 2
    text = format_loop(
        {"id": "motor", "period_ms": 10, "reason": reason, "model": "m", "scores": [1.0] * 100}
    )
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "\n                 " in text  # the continuation sits under the value column
    assert " ".join(text.split()).count("gap of 51.8 ms") == 2  # nothing cut
