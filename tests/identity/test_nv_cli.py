"""`edgerund attest verify` trusts the NV binding, not PCR 23 (docs/identity.md "Verifying").

The attack: a local process with TPM access resets PCR 23 and extends the digests of the
config and model the backend expects, then rewrites the result's PCR log to match, while
the gateway runs something else. The PCR check alone passes; the NV binding index (written
only by the daemon, certified by the AK over the verifier's nonce) still names what runs.
Every result here is a real swtpm quote and NV certification.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from edgerund.backend.enroll_cli import check_first_quote
from edgerund.backend.enrolment_record import EnrolmentRecord, record_path_for
from edgerund.backend.verify import expected_models_for_files, verify_result
from edgerund.cli import main
from edgerund.identity.tpm import TpmIdentity
from tests.fixtures.binaries import require_binary
from tests.fixtures.swtpm import SwtpmProcess
from tests.identity.conftest import tpm_config

pytestmark = pytest.mark.needs_swtpm

NONCE = b"\x5a" * 32
EVIL_CFG = hashlib.sha256(b"gateway:\n  id: gw-1\nuplink:\n  host: attacker.example\n").digest()
EVIL_MAN = hashlib.sha256(b'{"name": "motor-ae", "version": "6.6.6"}').digest()
OVL = hashlib.sha256(b'{"version": "2.0.0+cal.1"}').digest()


def tool(swtpm: SwtpmProcess, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """A tpm2-tools command, as another local process with TPM access runs it."""
    exe = require_binary(name, "apt-get install tpm2-tools")
    return subprocess.run(
        [exe, "-T", swtpm.tcti, *args], capture_output=True, timeout=30, check=False
    )


def deployed(tmp_path: Path) -> tuple[Path, Path, bytes, bytes]:
    """The config and manifest the backend deployed (and so expects)."""
    cfg = tmp_path / "edgerund.yaml"
    cfg.write_text("gateway:\n  id: gw-1\n")
    man = tmp_path / "motor-ae" / "manifest.json"
    man.parent.mkdir()
    man.write_text('{"name": "motor-ae", "version": "2.0.0"}')
    return (
        cfg,
        man,
        hashlib.sha256(cfg.read_bytes()).digest(),
        expected_models_for_files([man])["motor-ae"],
    )


def verify_cli(
    capsys: pytest.CaptureFixture[str], result: dict[str, Any], tmp_path: Path, *args: str
) -> tuple[int, str]:
    f = tmp_path / "result.json"
    f.write_text(json.dumps(result))
    capsys.readouterr()
    rc = main(["attest", "verify", "--result", str(f), "--nonce", NONCE.hex(), *args])
    return rc, capsys.readouterr().out


async def attest(
    swtpm: SwtpmProcess, state: Path, cfg: bytes, models: list[Any], nonces: list[bytes]
) -> list[Any]:
    """The daemon's identity binds `cfg` and `models` [(name, manifest, overlay)], quotes."""
    ident = TpmIdentity(tpm_config(swtpm.tcti), state)
    await ident.open()
    try:
        await ident.bind_config(cfg)
        for name, man, ovl in models:
            await ident.bind_model(
                man,
                name,
                overlay_sha256=ovl,
                overlay_version=None if ovl is None else "2.0.0+cal.1",
            )
        return [await ident.attest(n) for n in nonces]
    finally:
        await ident.close()


async def test_pcr_reset_attack_passes_the_pcr_check_and_is_refused_by_the_cli(
    swtpm: SwtpmProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_file, man_file, cfg, man = deployed(tmp_path)
    # the gateway actually runs another config and model (both bound by the daemon) ...
    ident = TpmIdentity(tpm_config(swtpm.tcti), tmp_path / "state")
    await ident.open()
    try:
        await ident.bind_config(EVIL_CFG)
        await ident.bind_model(EVIL_MAN, "motor-ae")
        # ... and a local process resets PCR 23 and extends what the backend expects
        assert tool(swtpm, "tpm2_pcrreset", "23").returncode == 0
        for d in (cfg, man):
            assert tool(swtpm, "tpm2_pcrextend", f"23:sha256={d.hex()}").returncode == 0
        r = await ident.attest(NONCE)
    finally:
        await ident.close()
    # the PCR log in the result is rewritten to the expected config/model (unsigned JSON)
    r["binding"] = {"pcr": 23, "config_sha256": cfg.hex(),
                    "models": [{"name": "motor-ae", "manifest_sha256": man.hex()}]}  # fmt: skip
    name = r["nv_binding"]["name"]
    ak = tmp_path / "ak.pem"
    ak.write_text(r["ak_pem"])
    expect = ["--expect-config", str(cfg_file), "--expect-model", str(man_file)]

    # the PCR check alone accepts it: this is what the CLI used to print VALID for
    pcr_only = verify_result(r, nonce=NONCE, ak_pem=r["ak_pem"], expected_config_sha256=cfg,
                             expected_models={"motor-ae": man},
                             insecure_skip_nv_binding=True)  # fmt: skip
    assert pcr_only.ok and pcr_only.bindings_verified == ["pcr"], pcr_only

    # the CLI verifies the NV binding: its last event names what really runs
    rc, out = verify_cli(capsys, r, tmp_path, "--ak-pem", str(ak), "--nv-name", name, *expect)
    assert rc == 1 and out.startswith("INVALID (nv_binding_mismatch)"), out
    assert EVIL_CFG.hex() in out
    rc, out = verify_cli(capsys, r, tmp_path, "--ak-pem", str(ak), "--nv-name", name,
                         "--json", *expect)  # fmt: skip
    v = json.loads(out)
    assert rc == 1 and (v["valid"], v["code"]) == (False, "nv_binding_mismatch")
    # rewriting the NV log too does not help: it no longer replays to the certified value
    forged = copy.deepcopy(r)
    forged["nv_binding"]["log"]["events"][-1] = {
        "config_sha256": cfg.hex(), "models": [{"name": "motor-ae", "manifest_sha256": man.hex()}]
    }  # fmt: skip
    rc, out = verify_cli(capsys, forged, tmp_path, "--ak-pem", str(ak), "--nv-name", name,
                         *expect)  # fmt: skip
    assert rc == 1 and out.startswith("INVALID (nv_binding_replay)"), out

    # (d) the insecure switch restores the old PCR-only verdict, and says so
    rc, out = verify_cli(capsys, r, tmp_path, "--ak-pem", str(ak), "--insecure-skip-nv-binding",
                         *expect)  # fmt: skip
    assert rc == 0 and out.startswith("VALID"), out
    assert "binding verified: PCR only" in out and "INSECURE: NV binding not verified" in out
    rc, out = verify_cli(capsys, r, tmp_path, "--ak-pem", str(ak), "--insecure-skip-nv-binding",
                         "--json", *expect)  # fmt: skip
    v = json.loads(out)
    assert rc == 0 and v["bindings_verified"] == ["pcr"] and v["nv_binding"] is None


async def test_cli_verifies_the_nv_binding_of_a_genuine_result_and_refuses_without_it(
    swtpm: SwtpmProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_file, man_file, cfg, man = deployed(tmp_path)
    old_nonce = b"\x01" * 32
    r, r_old = await attest(swtpm, tmp_path / "state", cfg, [("motor-ae", man, OVL)],
                            [NONCE, old_nonce])  # fmt: skip
    name = r["nv_binding"]["name"]
    ak = tmp_path / "ak.pem"
    ak.write_text(r["ak_pem"])
    expect = ["--expect-config", str(cfg_file), "--expect-model", str(man_file)]

    # (c) genuine: valid, both bindings, and the verdict names the NV event's models
    rc, out = verify_cli(capsys, r, tmp_path, "--ak-pem", str(ak), "--nv-name", name, *expect,
                         "--expect-overlay", f"motor-ae={OVL.hex()}")  # fmt: skip
    assert rc == 0 and out.startswith("VALID"), out
    assert f"binding verified: NV index 0x01500101 (Name {name}" in out
    assert (f"model motor-ae: manifest sha256 {man.hex()}, calibration 2.0.0+cal.1 "
            f"(overlay sha256 {OVL.hex()})") in out  # fmt: skip
    rc, out = verify_cli(capsys, r, tmp_path, "--ak-pem", str(ak), "--nv-name", name,
                         "--json", *expect)  # fmt: skip
    v = json.loads(out)
    assert rc == 0 and v["bindings_verified"] == ["pcr", "nv"], v
    nv = v["nv_binding"]
    assert (nv["verified"], nv["index"], nv["name"], nv["config_sha256"]) == (
        True, "0x01500101", name, cfg.hex())  # fmt: skip
    assert nv["models"] == [{"name": "motor-ae", "manifest_sha256": man.hex(),
                             "calibration": {"version": "2.0.0+cal.1",
                                             "overlay_sha256": OVL.hex()}}]  # fmt: skip
    # the calibration pin is applied to the NV event as well
    rc, out = verify_cli(capsys, r, tmp_path, "--ak-pem", str(ak), "--nv-name", name, *expect,
                         "--expect-overlay", "none")  # fmt: skip
    assert rc == 1 and out.startswith("INVALID (binding_mismatch)"), out

    # (b) nv_binding removed: refused with its own code (it used to be VALID)
    stripped = {k: v for k, v in r.items() if k != "nv_binding"}
    rc, out = verify_cli(capsys, stripped, tmp_path, "--ak-pem", str(ak), "--nv-name", name,
                         *expect)  # fmt: skip
    assert rc == 1 and out.startswith("INVALID (nv_binding_missing)"), out
    rc, out = verify_cli(capsys, stripped, tmp_path, "--ak-pem", str(ak),
                         "--insecure-skip-nv-binding", *expect)  # fmt: skip
    assert rc == 0 and "INSECURE" in out, out

    # the index Name must be pinned, and be the pinned one
    rc, out = verify_cli(capsys, r, tmp_path, "--ak-pem", str(ak), *expect)
    assert rc == 1 and out.startswith("INVALID (nv_name_untrusted)"), out
    other = "000b" + "11" * 32
    rc, out = verify_cli(capsys, r, tmp_path, "--ak-pem", str(ak), "--nv-name", other)
    assert rc == 1 and out.startswith("INVALID (nv_binding_index_name)"), out
    # a certification for another nonce (a replayed NV certify next to a fresh quote)
    spliced = copy.deepcopy(r)
    spliced["nv_binding"] = r_old["nv_binding"]
    rc, out = verify_cli(capsys, spliced, tmp_path, "--ak-pem", str(ak), "--nv-name", name)
    assert rc == 1 and out.startswith("INVALID (nv_binding_attest)"), out

    check_enrolment_record(capsys, r, stripped, tmp_path, expect)


def check_enrolment_record(
    capsys: pytest.CaptureFixture[str],
    r: dict[str, Any],
    stripped: dict[str, Any],
    tmp_path: Path,
    expect: list[str],
) -> None:
    # the enrolment record pins the AK and the Name (what `attest enroll` writes)
    verdict, warning = check_first_quote(r, NONCE, r["ak_pem"])
    assert verdict.ok and warning is None and verdict.nv_binding is not None
    rec = EnrolmentRecord(b"\x00\x0b" + bytes(32), r["ak_pem"], verdict.nv_binding["index"],
                          bytes.fromhex(verdict.nv_binding["name"]))  # fmt: skip
    rec_file = Path(record_path_for(str(tmp_path / "gw1-ak.pem")))
    assert rec_file.name == "gw1-ak.enrolment.json"
    rec_file.write_text(json.dumps(rec.as_dict()))
    assert EnrolmentRecord.from_dict(json.loads(rec_file.read_text())) == rec
    rc, out = verify_cli(capsys, r, tmp_path, "--enrolment", str(rec_file), *expect)
    assert rc == 0 and "binding verified: NV index" in out, out
    rc, out = verify_cli(capsys, stripped, tmp_path, "--enrolment", str(rec_file), *expect)
    assert rc == 1 and out.startswith("INVALID (nv_binding_missing)"), out
