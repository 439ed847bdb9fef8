"""The pure cores of the twin: merge patch (RFC 7386), the allow policy, the replay
guard, and the reload diff that names every changed key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgerund.config import diff
from edgerund.config.loader import parse_config
from edgerund.errors import TrustError
from edgerund.twin.auth import ReplayGuard
from edgerund.twin.desired import check_allowed, merge_patch, merged_data

BASE = """
gateway: {id: gw1, site: lab}
sensors:
  - {id: s1, driver: bme280, bus: 1, address: 0x76, rate_hz: 1}
loops:
  - id: l1
    period_ms: 100
    fallback: [{sensor: s1, channel: temperature, stat: mean, samples: 5, above: 40.0}]
    policy: {on_ticks: 10, off_ticks: 50}
"""


@pytest.mark.parametrize(
    ("target", "patch", "want"),
    [  # RFC 7386 appendix A (a selection)
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_rfc7386(target: object, patch: object, want: object) -> None:
    assert merge_patch(target, patch) == want


def test_patch_addresses_loops_by_id_and_validates() -> None:
    data = yaml.safe_load(BASE)
    merged = merged_data(data, {"loops": {"l1": {"policy": {"on_ticks": 3}}}})
    cfg = parse_config(yaml.safe_dump(merged))
    assert cfg.loops[0].policy.on_ticks == 3 and cfg.loops[0].period_ms == 100
    with pytest.raises(TrustError, match="does not add loops"):
        merged_data(data, {"loops": {"new": {"period_ms": 5}}})


@pytest.mark.parametrize(
    ("patch", "ok"),
    [
        ({"loops": {"l1": {"policy": {"threshold": 0.5}}}}, True),
        ({"logging": {"level": "debug"}}, True),
        ({"loops": {"l1": {"period_ms": 5}}}, False),
        ({"identity": {"kind": "software"}}, False),
        ({"twin": {"allow": ["*"]}}, False),  # forbidden even though allow says `*`...
        ({"paths": {"state_dir": "/tmp"}}, False),
        ({"updates": {"keyring_file": "/tmp/k"}}, False),
    ],
)
def test_allow_policy(patch: dict[str, object], ok: bool) -> None:
    allow = ["loops.*.policy", "logging.level", "twin", "paths", "updates"]  # ...or listed
    if ok:
        check_allowed(patch, allow)
    else:
        with pytest.raises(TrustError) as ei:
            check_allowed(patch, allow)
        assert ei.value.code == "forbidden_key"


def test_replay_guard_window_nonce_and_eviction_floor() -> None:
    g = ReplayGuard(window_s=10, capacity=3)
    now = 1_000_000
    g.check("aa" * 8, now, now)
    with pytest.raises(TrustError, match="already used"):
        g.check("aa" * 8, now, now)
    with pytest.raises(TrustError) as ei:
        g.check("bb" * 8, now - 11_000, now)
    assert ei.value.code == "expired"
    for i, n in enumerate(("b1", "b2", "b3")):
        g.check(n * 8, now + i + 1, now)
    assert len(g) == 3
    # "aa.." was evicted, but the floor keeps it (and anything older) out
    with pytest.raises(TrustError) as ei:
        g.check("aa" * 8, now, now)
    assert ei.value.code == "replay"
    with pytest.raises(TrustError) as ei:
        g.check("not hex", now, now)
    assert ei.value.code == "malformed"


def test_reload_diff_names_every_changed_key() -> None:
    old = parse_config(BASE)
    text = (
        BASE.replace("period_ms: 100", "period_ms: 50")
        .replace("on_ticks: 10", "on_ticks: 4")
        .replace("above: 40.0", "above: 41.0")
    )
    text += (
        "telemetry: {keep_acked_h: 2}\ndaemon: {shutdown_timeout_s: 9}\nlogging: {level: debug}\n"
    )
    new = parse_config(text)
    keys = diff.changes(old, new)
    live, restart = diff.split(keys)
    assert set(live) == {"loops.l1.policy", "loops.l1.fallback", "logging.level"}
    assert set(restart) == {
        "loops.l1.period_ms",
        "telemetry.keep_acked_h",
        "daemon.shutdown_timeout_s",
    }


def test_gate_policy_without_operator_keys_and_exemptions() -> None:
    import asyncio

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgerund.backend import twin as T
    from edgerund.errors import CommandError
    from edgerund.publisher import build as B
    from edgerund.twin.gate import CommandGate
    from edgerund.updates.keyring import parse_keyring

    pub, op = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()

    def ring(ops: list[Ed25519PrivateKey]) -> bytes:
        return B.keyring_bytes(
            B.make_keyring(
                [pub.public_key()],
                threshold=1,
                version=1,
                signers=[pub],
                operators=[k.public_key() for k in ops],
            )
        )

    current = [parse_keyring(ring([]))]
    gate = CommandGate(gateway="gw1", keyring=lambda: current[0], signer=None)
    cmd = T.command("status", "gw1", {"id": 3}, op)
    with pytest.raises(CommandError) as ei:
        gate.admit("status", cmd)
    assert ei.value.code == "no_operator_keys"
    assert gate.admit("rebirth", b"{}").nonce is None  # exempt: passes unsigned
    assert gate.admit("update", b"\x00binary").payload == b"\x00binary"
    current[0] = parse_keyring(ring([op]))  # a rotation adds the operator: read live
    admitted = gate.admit("status", cmd)
    assert admitted.keyid == B.keyid(op) and b'"id": 3' in admitted.payload
    # without a signer (no identity), the reply passes as it is
    assert asyncio.run(gate.seal("status", admitted, b"{}")) == b"{}"
    assert gate.status()["refused_by_reason"] == {"no_operator_keys": 1}


def test_config_with_patch_validates_the_merged_file_and_names_the_file_line(
    tmp_path: Path,
) -> None:
    """The patch is merged into the file's parsed data (no YAML round trip): the result
    is the file plus the patch, and an invalid patched value is named with the key path
    and the line of that key in the file."""
    from edgerund.errors import ConfigError
    from edgerund.twin.applier import config_with_patch

    f = tmp_path / "edgerund.yaml"
    f.write_text(BASE)
    cfg = config_with_patch(f, {"loops": {"l1": {"policy": {"on_ticks": 3}}}}, 7)
    assert cfg.loops[0].policy.on_ticks == 3 and cfg.loops[0].policy.off_ticks == 50
    assert cfg.loops[0].fallback[0].above == 40.0
    with pytest.raises(ConfigError) as exc:
        config_with_patch(f, {"loops": {"l1": {"policy": {"on_ticks": "often"}}}}, 8)
    line = BASE.splitlines().index("    policy: {on_ticks: 10, off_ticks: 50}") + 1
    assert exc.value.path is not None and "on_ticks" in exc.value.path
    assert f"{f} + twin desired v8:{line}:" in str(exc.value), str(exc.value)


def test_reported_material_counts_fetch_progress_in_tenths() -> None:
    from edgerund.twin.reported import material

    def doc(n: int) -> dict[str, object]:
        m = {"version": "2", "state": "fetching", "bytes": n, "size": 1000}
        return {"desired": {"version": 3, "models": {"m": m}}}

    assert material(doc(100)) == material(doc(150))  # same tenth: no publish
    assert material(doc(150)) != material(doc(250))  # next tenth: publish
    assert material(doc(1000))["desired"]["models"]["m"]["bytes"] == 10


def test_reported_hardware_id_and_labels_select_in_a_rollout() -> None:
    """The fleet selector (`--select 'hardware_id=pi5,labels.tier=canary'`) reads what the
    gateway reports from its config's `gateway` section."""
    from edgerund.backend.rolloutspec import facts_of, parse_selector
    from edgerund.twin.reported import build

    def reported(hw: str, labels: dict[str, str]) -> dict[str, object]:
        status = {"gateway": {"id": "gw", "site": "s", "hardware_id": hw, "labels": labels}}
        return build(
            status, seq=1, ts_ms=0, config_digest="d", origin={}, desired={},
            restart_needed=[], commands={},
        )  # fmt: skip

    sel = parse_selector("hardware_id=pi5,labels.tier=canary")
    canary = reported("pi5", {"tier": "canary"})
    assert canary["hardware_id"] == "pi5" and canary["labels"] == {"tier": "canary"}
    assert sel.matches(facts_of(canary))
    assert not sel.matches(facts_of(reported("pi5", {"tier": "main"})))
    assert not sel.matches(facts_of(reported("jetson-orin", {"tier": "canary"})))


def test_probation_names_a_sensor_the_change_broke_even_if_another_recovered() -> None:
    from edgerund.twin.applier import Health, judge

    before = Health(missed_ticks=5, sensors_ok=frozenset({"gps", "cabinet"}), connected=True)
    # same count of ok sensors: `drive` came back while `cabinet` failed
    after = Health(missed_ticks=5, sensors_ok=frozenset({"gps", "drive"}), connected=True)
    assert judge(before, after, 0) == (
        "sensors_failed",
        "sensors ok before the change, not now: cabinet",
    )
    healed = Health(
        missed_ticks=5, sensors_ok=frozenset({"gps", "cabinet", "drive"}), connected=True
    )
    assert judge(before, healed, 0) is None
    assert judge(before, Health(9, before.sensors_ok, True), 3) == (
        "missed_ticks",
        "loops missed 4 ticks during probation (max 3)",
    )
    assert judge(before, Health(5, before.sensors_ok, False), 0)[0] == "uplink_lost"  # type: ignore[index]
