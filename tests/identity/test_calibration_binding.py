"""A device calibration (`X+cal.N`) in the attestation: the binding PCR and the NV binding
measure the overlay digest after the model's manifest, the verifiers replay it and name
the calibration in force, a log that hides the calibration fails, and a rollback to `X`
measures the manifest alone again (docs/identity.md "Device calibrations")."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgerund.backend.attest_cli import parse_expect_overlay
from edgerund.backend.binding_verify import BindingError, verify_nv_binding
from edgerund.backend.verify import verify_result
from edgerund.identity import nvbinding
from edgerund.identity import tpmstruct as ts
from edgerund.identity.binding import (
    ANY_MODEL,
    ModelBinding,
    binding_value,
    model_digests,
    parse_model_entry,
)
from edgerund.identity.config import IdentityConfig
from edgerund.identity.software import SoftwareIdentity
from edgerund.identity.tpm import TpmIdentity
from tests.fixtures.swtpm import SwtpmProcess
from tests.identity.conftest import tpm_config

CFG = hashlib.sha256(b"gateway:\n  id: gw-cal\n").digest()
MAN = hashlib.sha256(b'{"name": "motor-ae", "version": "2.0.0"}').digest()
OVL1 = hashlib.sha256(b'{"version": "2.0.0+cal.1"}').digest()
OVL2 = hashlib.sha256(b'{"version": "2.0.0+cal.2"}').digest()
NONCE = b"\xc7" * 32


def h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


# ------------------------------------------------------------------ (a) pure replay


def test_uncalibrated_entries_replay_exactly_as_before() -> None:
    """Old results (no overlay keys) and null overlays give the v1 event and the PCR of
    manifest digests alone, computed here from the documented formulas."""
    v1 = h(b"edgerund-binding-v1\x00", CFG, h(b"motor-ae"), MAN)
    pcr = ts.extend(ts.extend(bytes(32), CFG), MAN)
    old = {"name": "motor-ae", "manifest_sha256": MAN.hex()}  # a result from before
    new = {**old, "overlay_sha256": None, "overlay_version": None}
    for entry in (old, new):
        m = parse_model_entry(entry)
        assert m.overlay_sha256 is None and m.calibration() is None
        assert nvbinding.binding_event(CFG, [m]) == v1 == nvbinding.event_digest(CFG, {m.name: MAN})
        assert binding_value(CFG, model_digests([m])) == pcr
        _, digests, _ = nvbinding.log_events(
            {"initial": "00" * 32, "events": [{"config_sha256": CFG.hex(), "models": [entry]}]}
        )
        assert digests == [v1]
    assert ModelBinding("motor-ae", MAN).as_log() == new


def test_a_calibrated_entry_extends_its_overlay_and_versions_the_nv_event() -> None:
    cal = ModelBinding("motor-ae", MAN, OVL1, "2.0.0+cal.1")
    other = ModelBinding("aaa", h(b"other manifest"))  # sorts first, uncalibrated
    # PCR: config, then per model by name its manifest, then its overlay
    assert binding_value(CFG, model_digests([cal, other])) == ts.extend(
        ts.extend(ts.extend(ts.extend(bytes(32), CFG), other.manifest_sha256), MAN), OVL1
    )
    # NV: the v2 preimage (uncalibrated models carry zeros in the overlay fields)
    want = h(
        b"edgerund-binding-v2\x00", CFG,
        h(b"aaa"), other.manifest_sha256, bytes(32), bytes(32),
        h(b"motor-ae"), MAN, OVL1, h(b"2.0.0+cal.1"),
    )  # fmt: skip
    assert nvbinding.binding_event(CFG, [cal, other]) == want
    base = nvbinding.binding_event(CFG, [ModelBinding("motor-ae", MAN), other])
    assert want != base
    # each of the overlay digest and the version is measured
    assert (
        nvbinding.binding_event(CFG, [ModelBinding("motor-ae", MAN, OVL2, "2.0.0+cal.1"), other])
        != want
    )
    assert (
        nvbinding.binding_event(CFG, [ModelBinding("motor-ae", MAN, OVL1, "2.0.0+cal.9"), other])
        != want
    )
    assert parse_model_entry(cal.as_log()) == cal
    assert cal.calibration() == {"version": "2.0.0+cal.1", "overlay_sha256": OVL1.hex()}
    with pytest.raises(ValueError, match="32 bytes"):
        ModelBinding("m", MAN, b"\x01" * 31)


def test_expect_overlay_option_parses() -> None:
    assert parse_expect_overlay([]) is None
    assert parse_expect_overlay(["none"]) == {ANY_MODEL: None}
    assert parse_expect_overlay([f"motor-ae={OVL1.hex()}", "b=NONE"]) == {
        "motor-ae": OVL1,
        "b": None,
    }
    for bad in ("xyz", "=none", f"m={OVL1.hex()[:-2]}"):
        with pytest.raises(Exception, match="expect-overlay"):
            parse_expect_overlay([bad])


async def test_software_identity_names_the_calibration_and_a_rollback_unbinds_it(
    tmp_path: Path,
) -> None:
    ident = SoftwareIdentity(IdentityConfig(), tmp_path)
    await ident.open()
    await ident.bind_config(CFG)
    await ident.bind_model(MAN, "motor-ae", overlay_sha256=OVL1, overlay_version="2.0.0+cal.1")
    r = await ident.attest(NONCE)
    assert r["binding"]["models"] == [
        {"name": "motor-ae", "manifest_sha256": MAN.hex(),
         "overlay_sha256": OVL1.hex(), "overlay_version": "2.0.0+cal.1"}
    ]  # fmt: skip
    assert r["pcrs"]["sha256:23"] == binding_value(CFG, [MAN, OVL1]).hex()

    def check(res: dict[str, Any], **kw: Any) -> Any:
        return verify_result(res, nonce=NONCE, insecure_skip_ak_trust=True,
                             allow_software=True, **kw)  # fmt: skip

    v = check(r, expected_config_sha256=CFG, expected_models={"motor-ae": MAN})
    assert v.ok, v  # the expected manifest matches its calibrated model ...
    assert v.models == [{"name": "motor-ae", "manifest_sha256": MAN.hex(),
                         "calibration": {"version": "2.0.0+cal.1",
                                         "overlay_sha256": OVL1.hex()}}]  # fmt: skip
    assert v.as_dict()["models"] == v.models  # ... and the verdict names the calibration
    assert check(r, expected_overlays={"motor-ae": OVL1}, expected_models={"motor-ae": MAN}).ok
    assert check(r, expected_overlays={ANY_MODEL: OVL1}, expected_models={"motor-ae": MAN}).ok
    # without the expected model set, a log can pass the overlay off as a second model's
    # manifest (the PCR does not measure names): the PCR verdict warns, the model set
    # refuses it
    forged = json.loads(json.dumps(r))
    forged["binding"]["models"] = [
        {"name": "motor-ae", "manifest_sha256": MAN.hex()},
        {"name": "zz", "manifest_sha256": OVL1.hex()},
    ]
    v = check(forged, expected_overlays={ANY_MODEL: None})
    assert v.ok and any("--expect-model" in w for w in v.warnings), v
    v = check(forged, expected_overlays={ANY_MODEL: None}, expected_models={"motor-ae": MAN})
    assert (v.ok, v.code) == (False, "binding_mismatch"), v
    for exp in ({ANY_MODEL: None}, {"motor-ae": OVL2}, {"nope": None}):
        v = check(r, expected_overlays=exp)
        assert (v.ok, v.code) == (False, "binding_mismatch"), (exp, v)
    assert "2.0.0+cal.1" in check(r, expected_overlays={ANY_MODEL: None}).message
    # the whole-PCR expectation of the base model alone no longer matches
    v = check(r, expected_binding=binding_value(CFG, [MAN]))
    assert (v.ok, v.code) == (False, "binding_mismatch")

    # rollback to X: the same model bound without an overlay measures the manifest alone
    await ident.bind_model(MAN, "motor-ae")
    r2 = await ident.attest(NONCE)
    assert r2["pcrs"]["sha256:23"] == binding_value(CFG, [MAN]).hex()
    assert r2["binding"]["models"][0]["overlay_sha256"] is None
    v = check(r2, expected_overlays={ANY_MODEL: None}, expected_binding=binding_value(CFG, [MAN]))
    assert v.ok and v.models[0]["calibration"] is None, v
    await ident.close()


# ------------------------------------------------------------------ (b) a log hiding it


def _strip_overlay(entries: list[dict[str, Any]], *, drop_keys: bool) -> None:
    for m in entries:
        if drop_keys:  # an old-format entry
            m.pop("overlay_sha256", None)
            m.pop("overlay_version", None)
        else:
            m["overlay_sha256"] = m["overlay_version"] = None


@pytest.mark.needs_swtpm
async def test_a_log_claiming_the_base_model_while_a_calibration_runs_fails(
    swtpm: SwtpmProcess, tmp_path: Path
) -> None:
    ident = TpmIdentity(tpm_config(swtpm.tcti), tmp_path)
    await ident.open()
    try:
        await ident.bind_config(CFG)
        await ident.bind_model(MAN, "motor-ae", overlay_sha256=OVL1, overlay_version="2.0.0+cal.1")
        r = await ident.attest(NONCE)
    finally:
        await ident.close()
    ak = r["ak_pem"]
    name = bytes.fromhex(r["nv_binding"]["name"])

    def nv(res: dict[str, Any], **kw: Any) -> Any:
        return verify_nv_binding(res, nonce=NONCE, ak_pem=ak, pinned_name=name, **kw)

    # honest: both bindings verify and name the calibration
    v = verify_result(r, nonce=NONCE, ak_pem=ak, nv_name=name, expected_models={"motor-ae": MAN})
    assert v.ok and v.models[0]["calibration"]["overlay_sha256"] == OVL1.hex(), v
    assert v.bindings_verified == ["pcr", "nv"]
    b = nv(r, expected_config_sha256=CFG, expected_models={"motor-ae": MAN})
    assert b.calibrations == {"motor-ae": {"version": "2.0.0+cal.1", "overlay_sha256": OVL1.hex()}}
    assert r["nv_binding"]["log"]["events"][-1]["models"][0]["overlay_sha256"] == OVL1.hex()
    with pytest.raises(BindingError, match="expected: model 'motor-ae' runs calibration"):
        nv(r, expected_overlays={ANY_MODEL: None})

    # the attacker's result: the same real quote and NV certification, with logs that say
    # "base model, no calibration" (null overlay, or the pre-calibration entry format)
    for drop_keys in (False, True):
        forged = json.loads(json.dumps(r))
        _strip_overlay(forged["binding"]["models"], drop_keys=drop_keys)
        _strip_overlay(forged["nv_binding"]["log"]["events"][-1]["models"], drop_keys=drop_keys)
        v = verify_result(
            forged, nonce=NONCE, ak_pem=ak, nv_name=name, expected_overlays={ANY_MODEL: None}
        )
        assert (v.ok, v.code) == (False, "binding_log"), v
        with pytest.raises(BindingError, match="replay"):
            nv(forged, expected_overlays={ANY_MODEL: None})
    # ... or that names another calibration / version than the one measured
    for key, value in (("overlay_sha256", OVL2.hex()), ("overlay_version", "2.0.0+cal.7")):
        forged = json.loads(json.dumps(r))
        forged["nv_binding"]["log"]["events"][-1]["models"][0][key] = value
        with pytest.raises(BindingError, match="replay"):
            nv(forged)
    forged = json.loads(json.dumps(r))
    forged["binding"]["models"][0]["overlay_sha256"] = OVL2.hex()
    assert verify_result(forged, nonce=NONCE, ak_pem=ak).code == "binding_log"


# ------------------------------------------------------------------ (c) end to end


def _attest(d: Any) -> tuple[dict[str, Any], bytes]:
    nonce = os.urandom(32)
    result: dict[str, Any] = d.call("attest", {"nonce": nonce.hex()})
    return result, nonce


@pytest.mark.slow
@pytest.mark.needs_swtpm
@pytest.mark.timeout(240)
def test_daemon_attests_an_installed_calibration_and_its_rollback(
    swtpm: SwtpmProcess, tmp_path: Path
) -> None:
    """The live daemon with a TPM identity: a real calibration through the update gate
    (`test-adapt` with no shift, committed), then a manual rollback to the base model."""
    from tests.helpers.daemon import DaemonProcess
    from tests.learning.test_daemon_calibration import config as calibration_config
    from tests.learning.test_daemon_drift import drift_of, wait_until

    cfg = calibration_config(tmp_path)
    cfg["models"][0]["auto_adapt"] = False
    cfg["updates"]["probation_s"] = 2.0
    cfg["identity"] = {"kind": "tpm", "tcti": swtpm.tcti}
    manifest = Path(cfg["models"][0]["path"]) / "manifest.json"
    man = hashlib.sha256(manifest.read_bytes()).digest()
    with DaemonProcess(tmp_path, cfg, env={"EDGERUND_TEST_HOOKS": "1"}) as d:
        d.wait_ready()
        config_sha = hashlib.sha256(d.config_path.read_bytes()).digest()
        base = d.call("models")[0]["version"]
        assert wait_until(lambda: drift_of(d).get("blocks", 0) >= 2, 30.0), d.log_text[-2000:]
        r, nonce = _attest(d)
        assert r["binding"]["models"][0]["overlay_sha256"] is None
        assert r["pcrs"]["sha256:23"] == binding_value(config_sha, [man]).hex()

        d.call("test-adapt", {"model": "motor-ae", "shift_sd": 0.0, "wait": "commit"},
               timeout_s=90.0)  # fmt: skip
        cal1 = f"{base}+cal.1"
        assert d.call("models")[0]["version"] == cal1
        slot = tmp_path / "state" / "models" / "motor-ae" / "current"
        overlay = hashlib.sha256((slot / "calibration.json").read_bytes()).digest()
        time.sleep(1.1)  # the attest rate limit
        r, nonce = _attest(d)
        ak = r["ak_pem"]
        entry = r["binding"]["models"][0]
        assert entry == {"name": "motor-ae", "manifest_sha256": man.hex(),
                         "overlay_sha256": overlay.hex(), "overlay_version": cal1}  # fmt: skip
        nv_name = bytes.fromhex(r["nv_binding"]["name"])
        v = verify_result(r, nonce=nonce, ak_pem=ak, nv_name=nv_name,
                          expected_config_sha256=config_sha,
                          expected_models={"motor-ae": man},
                          expected_overlays={"motor-ae": overlay})  # fmt: skip
        assert v.ok, v
        assert v.models[0]["calibration"] == {"version": cal1, "overlay_sha256": overlay.hex()}
        b = verify_nv_binding(r, nonce=nonce, ak_pem=ak,
                              pinned_name=bytes.fromhex(r["nv_binding"]["name"]),
                              expected_config_sha256=config_sha,
                              expected_models={"motor-ae": man},
                              expected_overlays={"motor-ae": overlay})  # fmt: skip
        assert b.calibrations["motor-ae"] == {"version": cal1, "overlay_sha256": overlay.hex()}

        # the upstream CLI on that result: valid for the manifest, the calibration named;
        # invalid when no calibration is expected
        result_file, ak_file = tmp_path / "quote.json", tmp_path / "ak.pem"
        result_file.write_text(json.dumps(r))
        ak_file.write_text(ak)

        def cli(*extra: str, expect: bool = True) -> subprocess.CompletedProcess[str]:
            deployed = ["--expect-config", str(d.config_path), "--expect-model", str(manifest)]
            return subprocess.run(
                [sys.executable, "-m", "edgerund.cli", "attest", "verify",
                 "--result", str(result_file), "--nonce", nonce.hex(), "--ak-pem", str(ak_file),
                 "--nv-name", r["nv_binding"]["name"], *(deployed if expect else []), *extra],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        ok = cli("--expect-overlay", f"motor-ae={overlay.hex()}")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert f"calibration {cal1} (overlay sha256 {overlay.hex()})" in ok.stdout
        assert "binding verified: NV index" in ok.stdout  # named from the NV event
        bad = cli("--expect-overlay", "none")
        assert bad.returncode == 1 and "binding_mismatch" in bad.stdout and cal1 in bad.stdout
        usage = cli("--expect-overlay", "none", expect=False)  # without the model set
        assert usage.returncode == 2 and "--expect-model" in usage.stderr, usage.stderr

        # rollback to X: re-measured without the overlay
        d.call("rollback", {"model": "motor-ae"}, timeout_s=60.0)
        assert wait_until(lambda: d.call("models")[0]["version"] == base, 20.0)
        time.sleep(1.1)
        r, nonce = _attest(d)
        assert r["binding"]["models"][0]["overlay_sha256"] is None
        assert r["pcrs"]["sha256:23"] == binding_value(config_sha, [man]).hex()
        v = verify_result(r, nonce=nonce, ak_pem=ak, nv_name=nv_name,
                          expected_overlays={ANY_MODEL: None})  # fmt: skip
        assert v.ok and v.models[0]["calibration"] is None, v
        b = verify_nv_binding(r, nonce=nonce, ak_pem=ak, expected_overlays={ANY_MODEL: None})
        assert b.calibrations == {"motor-ae": None}
        events = r["nv_binding"]["log"]["events"]
        assert any(m.get("overlay_sha256") == overlay.hex() for e in events for m in e["models"])


def test_the_runner_keeps_the_digest_of_the_overlay_it_applied(tmp_path: Path) -> None:
    from edgerund.inference.runner import ModelRunner
    from edgerund.updates.slots import SlotStore
    from tests.learning.test_calibration import SoftSigner
    from tests.learning.test_calslot import NAME, REF, calibration, install, overlay

    store = SlotStore(tmp_path / "models" / NAME, NAME)
    store.seed(REF, "a")
    doc, sig = overlay(calibration(), SoftSigner())
    install(store, doc, sig)
    r = ModelRunner.load(store.dir("b"), warmup_runs=1)
    base = ModelRunner.load(store.dir("a"), warmup_runs=1)
    try:
        raw = (store.dir("b") / "calibration.json").read_bytes()
        assert r.overlay_sha256 == hashlib.sha256(raw).digest()
        assert r.base_manifest.sha256 == base.manifest.sha256  # the binding's manifest
        assert base.overlay_sha256 is None
    finally:
        r.close()
        base.close()
