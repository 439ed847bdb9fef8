"""Issue #12.6/#12.7: the NV counter and the NV binding, attacked with tpm2-tools (swtpm)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from edgerund.backend.binding_verify import BindingError, verify_nv_binding
from edgerund.errors import DeviceError
from edgerund.identity import nvindex
from edgerund.identity.component import IdentityComponent, open_identity
from edgerund.identity.tpm import TpmIdentity
from edgerund.updates.counter import RefusedCounter, select_counter
from tests.fixtures.binaries import require_binary
from tests.fixtures.swtpm import SwtpmProcess
from tests.identity.conftest import make_config, make_context, tpm_config

pytestmark = pytest.mark.needs_swtpm
COUNTER = 0x01500100
BINDING = 0x01500101


async def opened(swtpm: SwtpmProcess, state: Path, **kw: Any) -> TpmIdentity:
    ident = TpmIdentity(tpm_config(swtpm.tcti, **kw), state)
    await ident.open()
    return ident


def tool(swtpm: SwtpmProcess, name: str, *args: str, data: bytes | None = None) -> Any:
    """Run a tpm2-tools command as another local process with TPM access would."""
    exe = require_binary(name, "apt-get install tpm2-tools")
    return subprocess.run(
        [exe, "-T", swtpm.tcti, *args], input=data, capture_output=True, timeout=30, check=False
    )


def esapi(swtpm: SwtpmProcess) -> Any:
    from tpm2_pytss import ESAPI

    return ESAPI(swtpm.tcti)


def state_of(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / "identity" / "tpm-enrolment.json").read_text()))


# ------------------------------------------------------------------ #12.6 counter


async def test_counter_cannot_be_incremented_by_other_tpm_users(
    swtpm: SwtpmProcess, tmp_path: Path
):
    ident = await opened(swtpm, tmp_path)
    try:
        before = await ident.counter_read()
    finally:
        await ident.close()
    # empty auth on the index (what inflated the old counter 1 -> 6), and owner auth
    for args in ([f"0x{COUNTER:08x}"], ["-C", "o", f"0x{COUNTER:08x}"]):
        proc = tool(swtpm, "tpm2_nvincrement", *args)
        assert proc.returncode != 0, proc.stderr
    ident = await opened(swtpm, tmp_path)
    try:
        assert await ident.counter_read() == before
        assert await ident.counter_increment() == before + 1  # the daemon still can
    finally:
        await ident.close()


async def _redefine(swtpm: SwtpmProcess, how: str) -> None:
    """An attacker with owner auth (empty on most devices) replaces the counter."""
    assert tool(swtpm, "tpm2_nvundefine", "-C", "o", f"0x{COUNTER:08x}").returncode == 0
    if how == "tools":  # a plain counter with empty auth, incremented to a low value
        p = tool(swtpm, "tpm2_nvdefine", "-C", "o", "-s", "8", "-a",
                 "nt=counter|authread|authwrite|no_da", f"0x{COUNTER:08x}")  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert tool(swtpm, "tpm2_nvincrement", f"0x{COUNTER:08x}").returncode == 0
        return
    # the SAME public area (policy read with tpm2_nvreadpublic), the attacker's own secret
    spec = nvindex.NvSpec(COUNTER, "counter", "nv_counter_index")
    with esapi(swtpm) as e:
        from tpm2_pytss.constants import ESYS_TR

        h = e.nv_define_space(b"attacker", nvindex.public_template(e, spec), ESYS_TR.OWNER)
        if how == "same-public-written":
            e.tr_set_auth(h, b"attacker")
            nvindex.write(e, h, spec)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("tools", r"is not edgerund's: attributes"),
        ("same-public-unwritten", r"never written \(TPM_RC_NV_UNINITIALIZED\)"),
        ("same-public-written", r"does not accept edgerund's NV secret"),
    ],
)
async def test_redefined_counter_is_refused_at_open(
    swtpm: SwtpmProcess, tmp_path: Path, how: str, reason: str
):
    ident = await opened(swtpm, tmp_path)
    await ident.counter_increment()
    await ident.close()
    await _redefine(swtpm, how)
    with pytest.raises(DeviceError, match=reason):
        await opened(swtpm, tmp_path)


async def test_undefined_counter_is_not_silently_recreated(swtpm: SwtpmProcess, tmp_path: Path):
    ident = await opened(swtpm, tmp_path)
    await ident.close()
    assert tool(swtpm, "tpm2_nvundefine", "-C", "o", f"0x{COUNTER:08x}").returncode == 0
    with pytest.raises(DeviceError, match=r"was undefined since enrolment"):
        await opened(swtpm, tmp_path)


async def test_legacy_empty_auth_counter_is_migrated_without_going_back(
    swtpm: SwtpmProcess, tmp_path: Path
):
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_NT, TPMA_NV
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    ident = await opened(swtpm, tmp_path)
    await ident.close()
    with esapi(swtpm) as e:  # the pre-fix layout: AUTHWRITE, empty auth, no policy, at 7
        e.nv_undefine_space(e.tr_from_tpmpublic(COUNTER), ESYS_TR.OWNER)
        attrs = (TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE | TPMA_NV.NO_DA
                 | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT))  # fmt: skip
        h = e.nv_define_space(b"", TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
            nvIndex=COUNTER, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=8)))  # fmt: skip
        for _ in range(3):
            e.nv_increment(h, auth_handle=h)
        old = int.from_bytes(bytes(e.nv_read(h, 8, 0, auth_handle=h)), "big")
    sf = tmp_path / "identity" / "tpm-enrolment.json"
    st = state_of(tmp_path)
    st["nv_counter"] = {"index": COUNTER}
    sf.write_text(json.dumps(st))
    ident = await opened(swtpm, tmp_path)
    try:
        assert ident.counter_migrated and await ident.counter_read() >= old
        assert state_of(tmp_path)["nv_counter"]["auth"] == "policy"
    finally:
        await ident.close()
    assert tool(swtpm, "tpm2_nvincrement", f"0x{COUNTER:08x}").returncode != 0


async def test_tpm_missing_with_software_fallback_refuses_the_counter(tmp_path: Path):
    from tests.fixtures.binaries import free_port

    cfg = make_config(
        tmp_path, kind="tpm", tcti=f"swtpm:host=127.0.0.1,port={free_port()}",
        fallback="software", call_timeout_ms=2000,
    )  # fmt: skip
    ident = await open_identity(cfg, tmp_path)
    try:
        assert ident.kind == "software"
        assert ident.counter_refusal and "TPM" in ident.counter_refusal
        assert ident.status()["counter_refused"] == ident.counter_refusal
        with pytest.raises(DeviceError, match="anti-rollback counter lives in the TPM"):
            await ident.counter_read()
        with pytest.raises(DeviceError, match="anti-rollback counter lives in the TPM"):
            await ident.counter_increment()
        counter = select_counter(ident, tmp_path / "updates-counter", 1000)
        assert isinstance(counter, RefusedCounter) and counter.refusal
        with pytest.raises(DeviceError, match="counter unavailable"):
            await counter.read()
        with pytest.raises(DeviceError, match="counter unavailable"):
            await counter.ratchet(5)
    finally:
        await ident.close()
    # a software identity chosen on purpose keeps its (documented best-effort) counter
    soft = await open_identity(make_config(tmp_path / "s", kind="software"), tmp_path / "s")
    assert soft.counter_refusal is None and await soft.counter_read() == 0
    assert select_counter(soft, tmp_path / "c", 10).refusal is None


# ------------------------------------------------------------------ #12.7 binding


def _verify(ident: TpmIdentity, result: dict[str, Any], nonce: bytes, **kw: Any) -> Any:
    return verify_nv_binding(
        result, nonce=nonce, ak_pem=ident.public_fields()["ak_pem"],
        pinned_name=bytes.fromhex(ident.state["nv_binding"]["name"]), **kw,
    )  # fmt: skip


async def test_pcr_reset_by_another_process_does_not_change_the_nv_binding(
    swtpm: SwtpmProcess, tmp_path: Path
):
    ident = await opened(swtpm, tmp_path)
    config = hashlib.sha256(b"gateway:\n  id: gw-test\n").digest()
    model = hashlib.sha256(b"manifest v1").digest()
    try:
        await ident.bind_config(config)
        await ident.bind_model(model, name="anomaly")
        n1 = b"\x01" * 32
        r1 = await ident.attest(n1)
        v1 = _verify(ident, r1, n1, expected_config_sha256=config,
                     expected_models={"anomaly": model})  # fmt: skip
        # another process resets PCR 23 and extends what a forged config would give
        forged = hashlib.sha256(b"forged config").digest()
        assert tool(swtpm, "tpm2_pcrreset", "23").returncode == 0
        assert tool(swtpm, "tpm2_pcrextend", f"23:sha256={forged.hex()}").returncode == 0
        # ... and cannot extend the NV binding index (write policy needs the daemon's secret)
        for args in (["-i-", f"0x{BINDING:08x}"], ["-C", "o", "-i-", f"0x{BINDING:08x}"]):
            assert tool(swtpm, "tpm2_nvextend", *args, data=forged).returncode != 0
        n2 = b"\x02" * 32
        r2 = await ident.attest(n2)
        assert r2["pcrs"]["sha256:23"] != r1["pcrs"]["sha256:23"]  # the PCR was forged ...
        v2 = _verify(ident, r2, n2, expected_config_sha256=config,
                     expected_models={"anomaly": model})  # fmt: skip
        assert v2.value == v1.value and v2.config_sha256 == config  # ... the NV binding not
        with pytest.raises(BindingError, match="expected"):
            _verify(ident, r2, n2, expected_config_sha256=forged)
        # the verifier refuses replays, a doctored log and a redefined index
        with pytest.raises(BindingError, match="attest: extraData"):
            _verify(ident, r2, n1)
        doctored = json.loads(json.dumps(r2))
        doctored["nv_binding"]["log"]["events"][-1]["config_sha256"] = forged.hex()
        with pytest.raises(BindingError, match="replay"):
            _verify(ident, doctored, n2)
        with pytest.raises(BindingError, match="index_name"):
            verify_nv_binding(r2, nonce=n2, ak_pem=ident.public_fields()["ak_pem"],
                              pinned_name=b"\x00\x0b" + bytes(32))  # fmt: skip
    finally:
        await ident.close()


async def test_reload_with_a_changed_config_rebinds(swtpm: SwtpmProcess, tmp_path: Path):
    cfg_path = tmp_path / "edgerund.yaml"
    cfg_path.write_text("gateway:\n  id: gw-test\n")
    ctx = make_context(tmp_path, config_path=cfg_path, kind="tpm", tcti=swtpm.tcti)
    comp = IdentityComponent(ctx)
    async with comp:
        ident = comp.identity
        assert isinstance(ident, TpmIdentity)
        n1 = b"\x03" * 16
        v1 = _verify(ident, await comp.attest(n1), n1,
                     expected_config_sha256=hashlib.sha256(cfg_path.read_bytes()).digest())  # fmt: skip
        cfg_path.write_text("gateway:\n  id: gw-test\nlogging:\n  level: debug\n")  # SIGHUP
        comp.reload(ctx.config)
        new = hashlib.sha256(cfg_path.read_bytes()).digest()
        for _ in range(100):
            if ident.config_sha256 == new:
                break
            await asyncio.sleep(0.05)
        n2 = b"\x04" * 16
        r2 = await comp.attest(n2)
        v2 = _verify(ident, r2, n2, expected_config_sha256=new)
        assert v2.value != v1.value and len(r2["nv_binding"]["log"]["events"]) >= 2
        assert r2["binding"]["config_sha256"] == new.hex()


async def test_binding_log_resynchronises_after_an_extend_it_missed(
    swtpm: SwtpmProcess, tmp_path: Path
):
    """A timed-out extend that still landed later must not break the log for good."""
    ident = await opened(swtpm, tmp_path)
    try:
        await ident.bind_config(hashlib.sha256(b"cfg").digest())
        spec = nvindex.NvSpec(BINDING, "extend", "nv_binding_index")
        # the late extend: applied in the TPM, unknown to the log
        await ident.worker.call(
            lambda e: nvindex.write(e, ident._h.nvb, spec, b"\x55" * 32), what="late extend"
        )
        model = hashlib.sha256(b"m").digest()
        await ident.bind_model(model, name="m")
        n = b"\x07" * 8
        v = _verify(ident, await ident.attest(n), n, expected_models={"m": model})
        assert v.config_sha256 == hashlib.sha256(b"cfg").digest()
    finally:
        await ident.close()
