"""The hub's config checks, through the lead's loader (FILE:LINE: key.path: message)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerund.config.loader import load_config
from edgerund.errors import ConfigError
from edgerund.hub.config import SIM_PORTS, driver_names

SIMULATE_YAML = Path(__file__).resolve().parents[2] / "edgerund" / "data" / "simulate.yaml"


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "edgerund.yaml"
    p.write_text("gateway:\n  id: gw1\n" + body)
    return p


def errors_of(tmp_path: Path, body: str) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, body))
    return str(ei.value)


def test_shipped_simulate_config_is_valid() -> None:
    cfg = load_config(SIMULATE_YAML)
    assert cfg.gateway.id == "sim-gw"
    assert cfg.simulation.enabled
    assert cfg.diag.socket.startswith("/tmp/edgerund-sim/")
    assert cfg.paths.state_dir.startswith("/tmp/edgerund-sim/")
    rates = {type(s).__struct_config__.tag: s.rate_hz for s in cfg.sensors}
    # the realistic set the simulated mode promises (others may be added around it)
    want = {
        "mpu6050": 200,
        "bme280": 1,
        "sht": 1,
        "ina219": 10,
        "ads1115": 10,
        "nmea": 1,
        "modbus": 2,
    }
    assert {k: rates.get(k) for k in want} == want


def test_duplicate_ids_and_shared_i2c_address(tmp_path: Path) -> None:
    msg = errors_of(
        tmp_path,
        """\
sensors:
  - {id: a, driver: bme280, bus: 1, address: 0x76}
  - {id: a, driver: sht, bus: 1, address: 0x44}
  - {id: c, driver: bme280, bus: 1, address: 0x76}
  - {id: d, driver: bme280, bus: 2, address: 0x76}
""",
    )
    assert "sensors[1].id: duplicate sensor id 'a'" in msg
    assert "sensors[2].address: I2C bus 1 address 0x76 is already used by sensor 'a'" in msg
    assert "sensors[3]" not in msg  # another bus: fine
    assert "edgerund.yaml:" in msg  # the loader adds FILE:LINE


def test_common_keys_out_of_range(tmp_path: Path) -> None:
    msg = errors_of(
        tmp_path,
        """\
sensors:
  - {id: a, driver: bme280, rate_hz: 0, read_timeout_ms: 0, fail_after: 0, retries: -1,
     reprobe_s: 0, window: 0}
""",
    )
    for key in ("rate_hz", "read_timeout_ms", "fail_after", "retries", "reprobe_s", "window"):
        assert f"sensors[0].{key}: expected" in msg, key


def test_serial_port_sharing_and_sim_ports(tmp_path: Path) -> None:
    msg = errors_of(
        tmp_path,
        """\
sensors:
  - {id: g1, driver: nmea, port: /dev/ttyUSB0}
  - {id: g2, driver: nmea, port: /dev/ttyUSB0}
  - {id: m1, driver: modbus, port: /dev/ttyUSB1, unit: 1, registers: [{name: v, address: 0}]}
  - {id: m2, driver: modbus, port: /dev/ttyUSB1, unit: 2, registers: [{name: v, address: 0}]}
  - {id: s1, driver: nmea, port: "sim://gps"}
""",
    )
    assert "sensors[1].port: port '/dev/ttyUSB0' is already used by sensor 'g1'" in msg
    assert "ttyUSB1" not in msg  # modbus units share an RS-485 line
    assert "sensors[4].port: 'sim://gps' is an emulated port" in msg

    msg = errors_of(
        tmp_path,
        """\
simulation: {enabled: true}
sensors:
  - {id: s1, driver: nmea, port: "sim://gsp"}
""",
    )
    assert "sensors[0].port: expected one of sim://gps" in msg

    msg = errors_of(
        tmp_path,
        "simulation: {enabled: true}\nsensors:\n  - {id: b, driver: bme280, bus: 3}\n",
    )
    assert "sensors[0].bus: in simulated mode the emulated I2C parts are on bus 1" in msg


def test_anomaly_schedule_checks(tmp_path: Path) -> None:
    msg = errors_of(
        tmp_path,
        """\
simulation:
  enabled: true
  anomalies:
    - {kind: overheat, start_s: -1, duration_s: 0, sensor: bme280}
""",
    )
    assert "simulation.anomalies[0].duration_s: expected > 0" in msg
    assert "simulation.anomalies[0].start_s: expected >= 0" in msg
    assert "simulation.anomalies[0].sensor: only a dropout names a sensor" in msg
    msg = errors_of(
        tmp_path, "simulation:\n  anomalies: [{kind: meteor, start_s: 1, duration_s: 1}]\n"
    )
    assert "meteor" in msg


def test_driver_names_and_sim_ports() -> None:
    names = driver_names()
    for n in ("bme280", "sht", "ads1115", "mpu6050", "ina219", "nmea", "modbus", "line", "cobs"):
        assert n in names
    assert SIM_PORTS == ("sim://gps", "sim://modbus", "sim://line", "sim://cobs")
