"""A calibration installed as a `X+cal.N` slot: the slot store writes it, slotcheck
re-verifies it (publisher/package side AND the device-signed overlay), the runner applies
it, and start-up recovery refuses a tampered, foreign or out-of-policy overlay with a
reason and runs the base model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from edgerund.context import EventBus
from edgerund.inference.calibration import Calibration, make_overlay, overlay_digest
from edgerund.inference.errors import ModelError
from edgerund.inference.manifest import load_manifest
from edgerund.inference.overlay import OVERLAY_FILE, OVERLAY_SIG, overlay_bytes
from edgerund.inference.runner import ModelRunner
from edgerund.updates import machine
from edgerund.updates.recovery import recover_model
from edgerund.updates.slotcheck import verify_slot
from edgerund.updates.slots import SlotStore
from tests.learning.test_calibration import SoftSigner

REF = Path(__file__).resolve().parents[2] / "models" / "reference"
NAME = "motor-ae"


def calibration(shift: float = 1.5, n: int = 16, declared: float | None = None) -> Calibration:
    """A calibration of the reference model shifting its first `n` features by `shift`
    reference sd (declaring `declared` instead when given: an inconsistent overlay)."""
    man = load_manifest(REF)
    spec, prof = man.preprocessing, man.profile
    assert prof is not None
    d = np.zeros(spec.n_features)
    d[:n] = shift
    m0, s0, sd = (np.asarray(v, np.float64) for v in (spec.mean, spec.std, prof.std))
    mean = (m0 + s0 * d * sd).astype(np.float32).astype(np.float64)
    dd = np.zeros(spec.n_features)
    dd[:n] = shift if declared is None else declared
    return Calibration(
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in s0.astype(np.float32)),
        threshold=float(np.float32(man.threshold * 1.1)),
        shift_sd=tuple(float(v) for v in dd),
        scale=tuple(1.0 for _ in d),
        samples=800,
        excluded_blocks=0,
        threshold_ratio=1.1,
        false_alarm_before=0.5,
        false_alarm_after=0.0,
        changes=[{"feature": "accel_g.x.band0", "shift_sd": shift, "scale": 1.0}],
    )


def overlay(cal: Calibration, signer: SoftSigner, seq: int = 1) -> tuple[dict[str, Any], bytes]:
    man = load_manifest(REF)
    assert man.adaptation is not None
    doc = make_overlay(
        cal,
        model=NAME,
        base_version=man.version,
        seq=seq,
        manifest_sha256=man.sha256,
        policy=man.adaptation,
        device_key_id=signer.key_id,
        created=1.0,
    )
    return doc, asyncio.run(signer.sign_digest(overlay_digest(doc)))


def install(store: SlotStore, doc: dict[str, Any], sig: bytes, slot: str = "b") -> None:
    store.prepare_calibration("a", {OVERLAY_FILE: overlay_bytes(doc), OVERLAY_SIG: sig})
    store.install_calibration(slot, "a", str(doc["version"]))


@pytest.fixture
def store(tmp_path: Path) -> SlotStore:
    s = SlotStore(tmp_path / "models" / NAME, NAME)
    s.seed(REF, "a")
    return s


def check(store: SlotStore, key: str | None, slot: str = "b") -> Any:
    return verify_slot(store.dir(slot), None, model=NAME, shipped_dir=REF, device_key=key)


def test_a_calibrated_slot_verifies_and_the_runner_applies_the_overlay(store: SlotStore) -> None:
    signer = SoftSigner()
    doc, sig = overlay(calibration(), signer)
    install(store, doc, sig)
    base = load_manifest(REF)
    v = check(store, signer.public_key_pem())
    assert v.ok, v
    assert v.version == f"{base.version}+cal.1" and "signed by this device" in v.message
    # the publisher's files are byte for byte the packaged ones
    for f in ("model.onnx", "manifest.json", "golden.npz"):
        assert (store.dir("b") / f).read_bytes() == (REF / f).read_bytes()
    r = ModelRunner.load(store.dir("b"), warmup_runs=2)  # golden vectors under the signed norm
    try:
        assert r.version == f"{base.version}+cal.1"
        assert r.threshold == pytest.approx(doc["threshold"]) != base.threshold
        assert r.manifest.threshold == r.threshold  # what the control loop reads
        assert r.base_manifest.version == base.version
        assert r.calibration is not None and r.calibration["samples"] == 800
        assert r.manifest.preprocessing.mean[0] != base.preprocessing.mean[0]
    finally:
        r.close()
    # the golden inputs were rerun under the overlay; a runtime whose calibrated
    # normalisation is not the overlay's (here: one feature's mean off) is refused
    r = ModelRunner.load(store.dir("b"), warmup_runs=2)
    try:
        r._pre._mean[3] += 0.5 * base.preprocessing.std[3]
        with pytest.raises(ModelError) as ei:
            r._check_golden_calibrated(np.load(store.dir("b") / "golden.npz"))
        assert ei.value.code == "golden_mismatch" and "under the calibration" in str(ei.value)
    finally:
        r.close()
    # without the device key no calibrated slot passes
    assert check(store, None).reason == "overlay_no_device_key"


def _rewrite(store: SlotStore, doc: dict[str, Any], sig: bytes | None = None) -> None:
    """An attacker with write access: new overlay bytes, and the unsigned marker fixed up
    so the store's own quick re-hash still agrees."""
    d = store.dir("b")
    (d / OVERLAY_FILE).write_bytes(overlay_bytes(doc))
    if sig is not None:
        (d / OVERLAY_SIG).write_bytes(sig)
    mk = json.loads((d / "slot.json").read_bytes())
    for rel in (OVERLAY_FILE, OVERLAY_SIG):
        from edgerund.updates.bundle import hash_file

        h = hash_file(d / rel)
        mk["files"][rel] = [h.size, h.sha256]
    (d / "slot.json").write_bytes(json.dumps(mk).encode())


def test_tampered_foreign_and_out_of_policy_overlays_are_refused(store: SlotStore) -> None:
    signer = SoftSigner()
    pem = signer.public_key_pem()
    doc, sig = overlay(calibration(), signer)
    install(store, doc, sig)
    assert store.verify_slot("b")
    # 1. the threshold raised on disk (to blind the model): the signature fails
    _rewrite(store, {**doc, "threshold": doc["threshold"] * 3})
    assert store.verify_slot("b")  # the unsigned marker is fooled ...
    v = check(store, pem)
    assert not v.ok and v.reason == "overlay_signature", v  # ... the signature is not
    # 2. a valid overlay of ANOTHER device (copied from a sister gateway)
    _rewrite(store, doc, sig)
    assert check(store, pem).ok
    assert check(store, SoftSigner().public_key_pem()).reason == "overlay_signature"
    # 3. validly signed by this device but outside the signed policy (max_shift_sd 4)
    wide, wsig = overlay(calibration(shift=5.0), signer)
    _rewrite(store, wide, wsig)
    v = check(store, pem)
    assert v.reason == "overlay_policy" and "shift_out_of_bounds" in v.message, v
    # 4. declares a small shift but installs a large one
    liar, lsig = overlay(calibration(shift=5.0, declared=1.0), signer)
    _rewrite(store, liar, lsig)
    assert check(store, pem).reason == "overlay_inconsistent"
    # 5. a marker claiming a calibration version the overlay does not carry
    _rewrite(store, doc, sig)
    mk = json.loads((store.dir("b") / "slot.json").read_bytes())
    mk["version"] = mk["version"].replace("+cal.1", "+cal.7")
    (store.dir("b") / "slot.json").write_bytes(json.dumps(mk).encode())
    assert check(store, pem).reason in ("overlay_binding", "slot_marker_mismatch")


def test_startup_refuses_a_tampered_overlay_and_runs_the_base_model(store: SlotStore) -> None:
    signer = SoftSigner()
    pem = signer.public_key_pem()
    doc, sig = overlay(calibration(), signer)
    install(store, doc, sig)
    info_a = store.rebuild_record().slots["a"]
    assert info_a is not None
    rec = machine.Record(
        model=NAME,
        state=machine.State.COMMITTED,
        active="b",
        slots={"a": info_a, "b": msgspec.structs.replace(info_a, version=str(doc["version"]))},
    )
    store.save_record(rec)
    store.flip("b")

    def recover() -> machine.Record:
        new, _ = asyncio.run(
            recover_model(store, REF, attempts=2, events=EventBus(), keyring=None, device_key=pem)
        )
        return new

    ok = recover()
    assert ok.active == "b" and ok.last_failure is None  # a good overlay runs
    _rewrite(store, {**doc, "threshold": doc["threshold"] * 3})
    new = recover()
    assert new.active == "a"  # the base model runs
    assert new.last_failure is not None and new.last_failure.reason == "overlay_signature"
    assert new.quarantined["b"].reason == "overlay_signature"
    assert store.marker("b") is None  # can never be flipped to
    assert (store.root / "current").readlink().name == "a"


def test_the_fit_uses_the_plant_since_the_drift_onset_only() -> None:
    from edgerund.inference.adapt import since_onset

    b = [(i, i, s) for i, s in enumerate(["ok", "ok", "anomaly", "anomaly", "drift", "drift"])]
    assert [x[0] for x in since_onset(b)] == [4, 5]  # not the plant before the step
    assert since_onset([(0, 0, "ok"), (1, 1, "drift")]) == [(0, 0, "ok"), (1, 1, "drift")]
    assert since_onset([(0, 0, "drift"), (1, 1, "sensor_fault")]) == []
