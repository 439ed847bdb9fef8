"""Issue #12.5: a failing signer never turns into silently unsigned telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from edgerund.backend.consumer import Consumer
from edgerund.errors import DeviceError
from tests.telemetry.conftest import (
    HubStandIn,
    identity_in,
    make_config,
    make_ctx,
    telemetry_in,
    until,
)


class FlakySigner:
    """The identity's signing interface, failing while `failing` is set (TPM hung/busy)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.failing = True
        self.kind = real.kind

    def public_key_pem(self) -> str:
        return str(self.real.public_key_pem())

    async def sign_digest(self, digest: bytes) -> bytes:
        if self.failing:
            raise DeviceError("TPM busy: 32 calls already queued")
        return bytes(await self.real.sign_digest(digest))


@contextlib.asynccontextmanager
async def _emitting(
    tmp_path: Path,
    mosquitto: Any,
    collector_factory: Any,
    wrap: Callable[[Any], Any],
    *,
    require_signature: bool = False,
    **uplink: Any,
) -> AsyncIterator[tuple[Any, Any, Any]]:
    """Telemetry signing through `wrap(real identity)`, 30 samples emitted, a consumer
    that knows the real key: yields (telemetry, collector, signer)."""
    cfg = make_config(tmp_path, mosquitto, uplink={"sign_retry_s": 0.3, **uplink})
    ctx = make_ctx(cfg, tmp_path)
    hub = HubStandIn([("env", "temp", "degC")])
    async with identity_in(ctx) as real:
        signer = wrap(real)
        key = Consumer.load_public_key(real.public_key_pem().encode())
        col = await collector_factory(
            mosquitto, public_keys=[key], require_signature=require_signature
        )
        async with telemetry_in(ctx, hub, signer=signer) as tel:
            t0 = time.time() - 5
            for i in range(30):
                hub.emit("env", "temp", 20 + 0.01 * i, t0 + i * 0.1)
            yield tel, col, signer


async def _run(tmp_path: Path, mosquitto: Any, collector_factory: Any, **uplink: Any) -> Any:
    async with _emitting(tmp_path, mosquitto, collector_factory, FlakySigner, **uplink) as (
        tel,
        col,
        flaky,
    ):
        return await _observe(tel, col, flaky, uplink.get("allow_unsigned", False))


async def _observe(tel: Any, col: Any, flaky: FlakySigner, allow_unsigned: bool) -> Any:
    st = lambda: tel.status()["telemetry"]  # noqa: E731
    if allow_unsigned:
        await until(lambda: st()["unsigned_batches"] >= 1, 20, "unsigned publish")
        await col.wait_for(lambda: col.consumer.counts["batches"] >= 1, 20)
        assert col.consumer.counts["unverified"] >= 1  # published without a signature
        return st()
    await until(lambda: st()["sign_held_batches"] >= 2, 20, "batches held")
    await until(lambda: st()["connected"], 20, "connected")
    # held: nothing reached the broker, the backlog stays in the spool
    assert col.consumer.counts["batches"] == 0
    assert st()["backlog_batches"] >= 1 and st()["unsigned_batches"] == 0
    flaky.failing = False  # the TPM answers again: the held batches go out SIGNED
    await until(lambda: st()["backlog_batches"] == 0, 30, "backlog drained")
    await col.wait_for(lambda: col.consumer.counts["batches"] >= 1, 20)
    assert col.consumer.counts["unverified"] == 0  # every batch arrived signed
    return st()


async def test_failing_signer_holds_batches_in_the_spool(
    tmp_path: Path, mosquitto: Any, collector_factory: Any
) -> None:
    st = await _run(tmp_path, mosquitto, collector_factory)
    assert st["sign_held_batches"] >= 2 and st["unsigned_batches"] == 0


async def test_unsigned_only_when_configured(
    tmp_path: Path, mosquitto: Any, collector_factory: Any
) -> None:
    st = await _run(tmp_path, mosquitto, collector_factory, allow_unsigned=True)
    assert st["unsigned_batches"] >= 1 and st["sign_held_batches"] == 0


class LosesFirstCalls:
    """The identity's signing interface, never answering its first `n` calls (a TPM call
    whose answer was lost), then signing normally."""

    def __init__(self, real: Any, n: int) -> None:
        self.real = real
        self.kind = real.kind
        self.lost = n

    def public_key_pem(self) -> str:
        return str(self.real.public_key_pem())

    async def sign_digest(self, digest: bytes) -> bytes:
        if self.lost > 0:
            self.lost -= 1
            await asyncio.Event().wait()  # never answered
        return bytes(await self.real.sign_digest(digest))


async def test_a_signature_never_answered_does_not_wedge_the_uplink(
    tmp_path: Path, mosquitto: Any, collector_factory: Any
) -> None:
    """The birth's meta signature is the first call: it never returns. The session must
    neither wait for it for ever (nothing sent again: soak, 2026-12-06) nor send unsigned."""
    async with _emitting(
        tmp_path,
        mosquitto,
        collector_factory,
        lambda real: LosesFirstCalls(real, 1),
        require_signature=True,
        ack_timeout_s=1.0,
    ) as (tel, col, signer):
        st = lambda: tel.status()["telemetry"]  # noqa: E731
        await until(lambda: st()["sent_batches"] >= 1, 20, "a batch sent")
        await col.wait_for(lambda: col.consumer.counts["batches"] >= 1, 20)
        assert signer.lost == 0  # the lost call happened, and the session went on
        assert col.consumer.counts["unverified"] == 0 and st()["unsigned_batches"] == 0
