"""Pure modules: the key-rotation matrix, canonical form, the transition table and the
recovery table."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerund.errors import TrustError
from edgerund.publisher import build as B
from edgerund.updates import machine
from edgerund.updates.keyring import check_rotation, check_self_signed, parse_keyring
from edgerund.updates.manifest import MANIFEST_DOMAIN, canonical, decode_manifest, signing_message

K = [Ed25519PrivateKey.generate() for _ in range(6)]
OLD = K[:3]  # keyring v1: keys 0,1,2 threshold 2
NEW = K[2:5]  # keyring v2: keys 2,3,4 threshold 2 (key 2 carried over)


def kr(
    keys: list[Ed25519PrivateKey],
    version: int,
    signers: list[Ed25519PrivateKey],
    threshold: int = 2,
    expires: float | None = None,
) -> bytes:
    return B.keyring_bytes(
        B.make_keyring(
            [k.public_key() for k in keys],
            threshold=threshold,
            version=version,
            signers=signers,
            expires=expires,
        )
    )


V1 = parse_keyring(kr(OLD, 1, OLD[:2]))


@pytest.mark.parametrize(
    ("signers", "version", "expect"),
    [
        # threshold of old AND of new
        ([K[0], K[1], K[3], K[4]], 2, None),
        ([K[0], K[2], K[3]], 2, None),  # key 2 counts for both sides
        # only old keys
        ([K[0], K[1]], 2, "keyring_new_unknown_key"),
        # only new keys
        ([K[3], K[4]], 2, "keyring_old_unknown_key"),
        # one old + one new
        ([K[0], K[3]], 2, "keyring_old_below_threshold"),
        # the same old key twice does not make two
        ([K[0], K[0], K[3], K[4]], 2, "keyring_old_below_threshold"),
        # unknown keys only
        ([K[5]], 2, "keyring_old_unknown_key"),
        # no signatures
        ([], 2, "keyring_old_unsigned"),
        # version rules
        ([K[0], K[1], K[3], K[4]], 1, "keyring_rollback"),
        ([K[0], K[1], K[3], K[4]], 3, "keyring_version_jump"),
    ],
)
def test_rotation_matrix(
    signers: list[Ed25519PrivateKey], version: int, expect: str | None
) -> None:
    new = parse_keyring(kr(NEW, version, signers))
    if expect is None:
        check_rotation(V1, new, time.time())
    else:
        with pytest.raises(TrustError) as ei:
            check_rotation(V1, new, time.time())
        assert ei.value.code == expect


def test_rotation_expired_and_chained() -> None:
    new = parse_keyring(kr(NEW, 2, [K[0], K[1], K[3], K[4]], expires=time.time() - 10))
    with pytest.raises(TrustError) as ei:
        check_rotation(V1, new, time.time())
    assert ei.value.code == "keyring_expired"
    v2 = parse_keyring(kr(NEW, 2, [K[0], K[1], K[3], K[4]]))
    check_rotation(V1, v2, time.time())
    # v3 must be endorsed by v2's owners: v1's old keys 0,1 no longer count
    v3 = parse_keyring(kr(NEW, 3, [K[0], K[1], K[3], K[4]]))
    check_rotation(v2, v3, time.time())
    bad = parse_keyring(kr(OLD, 3, [K[0], K[1], K[2]]))
    with pytest.raises(TrustError) as ei:
        check_rotation(v2, bad, time.time())
    assert ei.value.code == "keyring_old_below_threshold"  # only K2 is a v2 owner


def test_keyring_structure_errors() -> None:
    doc = json.loads(kr(OLD, 1, OLD[:2]))
    doc["signed"]["keys"][0]["keyid"] = "0" * 64  # keyid not the key's hash
    with pytest.raises(TrustError) as ei:
        parse_keyring(json.dumps(doc).encode())
    assert ei.value.code == "keyring_malformed"
    with pytest.raises(TrustError) as ei:
        check_self_signed(parse_keyring(kr(OLD, 1, [K[5]])))
    assert ei.value.code == "keyring_unknown_key"
    with pytest.raises(TrustError):
        parse_keyring(kr(OLD, 1, OLD, threshold=4))


def test_canonical_form_and_domain_separation() -> None:
    a = {"b": 1, "a": [1.5, "é"], "c": {"y": None, "x": True}}
    assert canonical(a) == b'{"a":[1.5,"\xc3\xa9"],"b":1,"c":{"x":true,"y":null}}'
    assert canonical(json.loads(json.dumps(a, indent=4))) == canonical(a)
    assert signing_message(MANIFEST_DOMAIN, a).startswith(b"edgerund-manifest-v1\x00")
    # a keyring signature is never a manifest signature
    body = {"x": 1}
    sig = K[0].sign(signing_message(B.KEYRING_DOMAIN, body))
    from cryptography.exceptions import InvalidSignature

    with pytest.raises(InvalidSignature):
        K[0].public_key().verify(sig, signing_message(MANIFEST_DOMAIN, body))


def test_duplicate_keys_refused() -> None:
    with pytest.raises(TrustError) as ei:
        decode_manifest(b'{"schema": 1, "schema": 2}')
    assert ei.value.code == "manifest_malformed" and "duplicate" in str(ei.value)


def _dep() -> machine.Deployment:
    return machine.Deployment(bundle_id="x", version="2", security_counter=1, source="t")


def test_happy_path_actions() -> None:
    rec = machine.Record(
        model="m",
        active="a",
        slots={
            "a": machine.SlotInfo(
                version="1", bundle_id="s", security_counter=0, manifest_sha256=""
            ),
            "b": None,
        },
    )
    trace = []
    rec, acts = machine.step(rec, machine.Event("receive", deployment=_dep()))
    trace.append((rec.state, [a.kind for a in acts]))
    for _ in range(6):
        rec, acts = machine.step(rec, machine.Event("ok"))
        trace.append((rec.state, [(a.kind, a.slot) for a in acts]))
    rec, acts = machine.step(rec, machine.Event("ratcheted"))
    assert [s for s, _ in trace] == [
        "RECEIVED",
        "VERIFIED",
        "STAGED",
        "PRECHECKED",
        "TRIAL",
        "PROBATION",
        "COMMITTED",
    ]
    assert all(
        acts_[0] in (machine.ActionKind.PERSIST, (machine.ActionKind.PERSIST, None))
        for _, acts_ in trace
    )
    assert trace[1][1][1] == (machine.ActionKind.STAGE, "b")
    assert trace[4][1][1:] == [(machine.ActionKind.FLIP, "b"), (machine.ActionKind.SWAP, "b")]
    assert rec.active == "b" and rec.attempts == 1 and rec.ratcheted
    assert rec.slots["b"].version == "2" and rec.slots["a"].version == "1"


def test_every_event_outside_table_refused() -> None:
    for st in machine.State:
        for ev in ("receive", "ok", "fail", "rollback", "ratcheted"):
            rec = machine.Record(
                model="m",
                state=st,
                active="a",
                deployment=_dep(),
                slots={
                    "a": machine.SlotInfo(
                        version="1", bundle_id="s", security_counter=0, manifest_sha256=""
                    ),
                    "b": None,
                },
            )
            if (st, ev) in machine.TABLE:
                continue
            with pytest.raises(machine.InvalidTransition):
                machine.step(rec, machine.Event(ev, deployment=_dep()))  # type: ignore[arg-type]


@pytest.mark.parametrize("state", list(machine.State))
def test_recovery_table_covers_every_state(state: machine.State) -> None:
    dep = machine.msgspec.structs.replace(_dep(), target="b")
    rec = machine.Record(
        model="m",
        state=state,
        active="a",
        deployment=dep,
        attempts=1,
        slots={
            "a": machine.SlotInfo(
                version="1", bundle_id="s", security_counter=0, manifest_sha256=""
            ),
            "b": None,
        },
        ratcheted=state is not machine.State.COMMITTED,
    )
    new, acts = machine.recover(rec, max_attempts=2, now=0.0)
    kinds = [a.kind for a in acts]
    assert state in machine.RECOVERY
    assert (machine.ActionKind.FLIP, "a") in [
        (a.kind, a.slot) for a in acts
    ]  # `current` -> committed slot
    assert (
        new.state
        in {machine.State.REJECTED, machine.State.STAGED, machine.State.PRECHECKED}
        | machine.TERMINAL
    )
    if state in (machine.State.TRIAL, machine.State.PROBATION):
        assert new.state is machine.State.PRECHECKED and machine.ActionKind.RESUME_TRIAL in kinds
        gave_up, acts2 = machine.recover(
            machine.msgspec.structs.replace(rec, attempts=2), max_attempts=2, now=0.0
        )
        assert (
            gave_up.state is machine.State.ROLLED_BACK
            and gave_up.last_failure.reason == "crash_loop"
        )
        assert (machine.ActionKind.INVALIDATE, "b") in [(a.kind, a.slot) for a in acts2]
    if state is machine.State.COMMITTED:
        assert machine.ActionKind.RATCHET in kinds
