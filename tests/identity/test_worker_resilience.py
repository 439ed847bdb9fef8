"""Issue #12.5: a burst or a hung TPM must not wedge the identity (real swtpm)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edgerund.component import CommandError, Peer
from edgerund.errors import DeviceError
from edgerund.identity.tpm import TpmIdentity
from edgerund.identity.tpm_errors import TCTI_LAYER, TpmError
from edgerund.identity.worker import TpmBusy
from tests.fixtures.swtpm import SwtpmProcess
from tests.identity.conftest import make_identity, tpm_config

pytestmark = pytest.mark.needs_swtpm


async def opened(swtpm: SwtpmProcess, state: Path, **kw: Any) -> TpmIdentity:
    ident = TpmIdentity(tpm_config(swtpm.tcti, **kw), state)
    await ident.open()
    return ident


def check_sig(ident: TpmIdentity, digest: bytes, der: bytes) -> None:
    key = serialization.load_pem_public_key(ident.public_key_pem().encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


async def test_queue_time_does_not_count_toward_the_timeout(swtpm: SwtpmProcess, tmp_path: Path):
    """Queued signatures take far longer than call_timeout_ms in total; none times out.

    Before the fix the timeout ran from submission, so the tail of the burst 'timed out'
    while waiting its turn and the first such timeout wedged the TPM until restart.
    """
    ident = await opened(swtpm, tmp_path, call_timeout_ms=250, max_queued_calls=10000)
    try:
        digest = hashlib.sha256(b"x").digest()
        n, elapsed = 200, 0.0
        while elapsed < 0.75 and n <= 6400:  # until the burst clearly outlasts the timeout
            t0 = time.monotonic()
            sigs = await asyncio.gather(*(ident.sign_digest(digest) for _ in range(n)))
            elapsed = time.monotonic() - t0
            assert len(sigs) == n
            n *= 2
        assert ident.worker.timeouts == 0 and not ident.worker.wedged
        check_sig(ident, digest, sigs[-1])
    finally:
        await ident.close()
    assert elapsed >= 0.75, f"burst took {elapsed:.2f}s: too fast to prove the point"


async def test_burst_gets_busy_answers_and_never_wedges(swtpm: SwtpmProcess, tmp_path: Path):
    ident = await opened(swtpm, tmp_path, max_queued_calls=8)
    try:
        digest = hashlib.sha256(b"burst").digest()
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(ident.sign_digest(digest) for _ in range(100)), return_exceptions=True
        )
        busy = [r for r in results if isinstance(r, TpmBusy)]
        ok = [r for r in results if isinstance(r, bytes)]
        other = [r for r in results if not isinstance(r, (bytes, TpmBusy))]
        assert other == []
        assert len(ok) == 8 and len(busy) == 92  # the queue bound, answered at once
        assert "busy" in str(busy[0]) and busy[0].code == "busy"
        assert time.monotonic() - t0 < 5
        assert not ident.worker.wedged and ident.worker.busy_refusals == 92
        # later calls are served normally
        check_sig(ident, digest, await ident.sign_digest(digest))
        assert await ident.counter_read() >= 1
        assert ident.status()["tpm_busy_refusals"] == 92
    finally:
        await ident.close()


async def test_hung_tpm_call_times_out_then_the_context_is_reopened(
    swtpm: SwtpmProcess, tmp_path: Path
):
    ident = await opened(swtpm, tmp_path, call_timeout_ms=500)
    digest = hashlib.sha256(b"hang").digest()
    assert swtpm.pid is not None
    try:
        before = await ident.counter_read()
        os.kill(swtpm.pid, signal.SIGSTOP)  # the TPM stops answering mid-operation
        try:
            t0 = time.monotonic()
            with pytest.raises(DeviceError, match=r"did not answer within 0.5 s"):
                await ident.sign_digest(digest)
            assert time.monotonic() - t0 < 2.0
            assert ident.worker.wedged and ident.status()["tpm_state"] == "recovering"
            await asyncio.sleep(1.0)  # hung for longer than the timeout
        finally:
            os.kill(swtpm.pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while True:  # the worker re-opens a new context; calls succeed again
            try:
                der = await ident.sign_digest(digest)
                break
            except DeviceError:
                assert time.monotonic() < deadline, "the identity never recovered"
                await asyncio.sleep(0.3)
        check_sig(ident, digest, der)
        assert ident.worker.reopens >= 1 and not ident.worker.wedged
        assert await ident.counter_read() == before  # NV handles re-attached on the new context
        r = await ident.attest(b"\x01" * 16)
        assert r["nv_binding"]["log"]["events"]  # the binding log survived the reopen
    finally:
        await ident.close()


async def test_attest_is_rate_limited_per_client_uid(swtpm: SwtpmProcess, tmp_path: Path):
    comp = make_identity(
        tmp_path, kind="tpm", tcti=swtpm.tcti, attest_rate_per_s=0.5, attest_burst=3
    )
    async with comp:
        cmd = comp.commands()["attest"]
        alice, bob = Peer(pid=1, uid=1001, gid=1001), Peer(pid=2, uid=1002, gid=1002)
        for _ in range(3):
            await cmd.handler({"nonce": "00" * 16}, alice)
        with pytest.raises(CommandError) as err:
            await cmd.handler({"nonce": "00" * 16}, alice)
        assert err.value.code == "rate_limited" and "uid 1001" in str(err.value)
        await cmd.handler({"nonce": "11" * 16}, bob)  # another client is not starved


async def test_a_call_started_on_an_abandoned_context_fails_instead_of_hanging(
    swtpm: SwtpmProcess, tmp_path: Path
):
    """The worker thread may take the next job before the loop abandons the generation
    whose previous job broke the transport: that job got no watchdog and, stuck in
    libtss2, was never answered (the soak's uplink waited for its meta signature forever)."""
    ident = await opened(swtpm, tmp_path, call_timeout_ms=500)
    a_started, a_go, b_release = threading.Event(), threading.Event(), threading.Event()

    def broken_transport(_ectx: Any) -> None:
        a_started.set()
        a_go.wait(5)
        raise TpmError("tcti: IO failure", TCTI_LAYER | 0xA, "sign a digest")

    def stuck_in_libtss2(_ectx: Any) -> None:
        b_release.wait(10)

    try:
        a = asyncio.ensure_future(ident.worker.call(broken_transport, what="sign a digest"))
        b = asyncio.ensure_future(ident.worker.call(stuck_in_libtss2, what="sign a digest"))
        assert await asyncio.to_thread(a_started.wait, 5)
        a_go.set()
        # Hold the loop: the thread posts A's failure, takes B and starts it before the
        # loop abandons the generation (the interleaving the soak met).
        time.sleep(0.3)  # noqa: ASYNC251 - blocking on purpose, see above
        with pytest.raises(TpmError):
            await a
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match="stopped answering"):
            await asyncio.wait_for(b, 3.0)
        assert time.monotonic() - t0 < 1.0
        assert ident.worker.wedged
    finally:
        b_release.set()
        await ident.close()
