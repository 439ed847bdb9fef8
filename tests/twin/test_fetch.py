"""The bundle fetch of model targets (twin/fetch.py) against a real mosquitto: resumed from
the partial file after a cancel (a new fetcher, as after a restart, asks only for what is
missing), chunks arriving out of order, a chunk of the wrong length, an oversized chunk
(dropped by the broker under the session's Maximum Packet Size, so the fetch waits for
the genuine one), a meta that disagrees with the signed target."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgerund.errors import TrustError
from edgerund.twin.bundlewire import BundleMeta, chunk_topic, meta_topic
from edgerund.twin.fetch import BundleFetcher
from edgerund.twin.targets import Target
from edgerund.updates.transfer import TransferError
from tests.twin.fetchers import make_fetcher
from tests.twin.rangeserver import RangeServer
from tests.updates.support import wait_for

C = 4096


def _fetcher(root: Path, broker: Any) -> BundleFetcher:
    return make_fetcher(root, broker, C, backoff_initial_s=0.1)


def _blob(n: int) -> tuple[bytes, BundleMeta, Target]:
    blob = os.urandom(n)
    meta = BundleMeta.plan(n, hashlib.sha256(blob).hexdigest(), C)
    return blob, meta, Target("m", "1.0.0", meta.sha256, n)


async def _pub(broker: Any, msgs: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        for topic, payload in msgs:
            await c.publish(topic, payload, qos=1, retain=True)


def _chunk(blob: bytes, i: int) -> bytes:
    return blob[i * C : (i + 1) * C]


async def _until(pred: Any, timeout_s: float = 20.0) -> None:
    await wait_for(pred, timeout_s)


async def test_resume_after_cancel_and_out_of_order(tmp_path: Path, mosquitto: Any) -> None:
    blob, meta, t = _blob(10 * C - 123)
    await _pub(mosquitto, [(chunk_topic(t.sha256, i), _chunk(blob, i)) for i in range(5)])
    await _pub(mosquitto, [(meta_topic(t.sha256), meta.to_json())])
    seen: list[int] = []
    task = asyncio.create_task(_fetcher(tmp_path, mosquitto).fetch(t, progress=seen.append))
    await _until(lambda: seen and seen[-1] == 5 * C)
    await asyncio.sleep(0.3)  # nothing more is coming
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (tmp_path / f"{t.sha256}.part").read_bytes() == blob[: 5 * C]

    # "restart": a new fetcher on the same directory resumes at 5 chunks
    seen2: list[int] = []
    task = asyncio.create_task(_fetcher(tmp_path, mosquitto).fetch(t, progress=seen2.append))
    await _until(lambda: seen2 and seen2[-1] == 5 * C)
    await asyncio.sleep(0.3)  # subscribed to chunks 5..8 by now
    # published live, last first: they arrive out of order and wait in the window
    await _pub(mosquitto, [(chunk_topic(t.sha256, i), _chunk(blob, i)) for i in (9, 8, 7, 6, 5)])
    path = await asyncio.wait_for(task, 20)
    assert path.read_bytes() == blob
    assert seen2[0] == 5 * C and min(seen2) == 5 * C  # never started over
    assert not (tmp_path / f"{t.sha256}.part").exists()


async def test_wrong_length_chunk_refused(tmp_path: Path, mosquitto: Any) -> None:
    blob, meta, t = _blob(3 * C)
    msgs = [(chunk_topic(t.sha256, i), _chunk(blob, i)) for i in range(3)]
    msgs[1] = (msgs[1][0], msgs[1][1][:100])
    await _pub(mosquitto, [*msgs, (meta_topic(t.sha256), meta.to_json())])
    with pytest.raises(TrustError) as ei:
        await asyncio.wait_for(_fetcher(tmp_path, mosquitto).fetch(t, progress=print), 20)
    assert ei.value.code == "bad_chunk"
    assert not (tmp_path / f"{t.sha256}.part").exists()


async def test_oversized_chunk_never_delivered(tmp_path: Path, mosquitto: Any) -> None:
    blob, meta, t = _blob(3 * C)
    huge = os.urandom(64 * C)  # far above the session's Maximum Packet Size
    await _pub(
        mosquitto,
        [
            (chunk_topic(t.sha256, 0), _chunk(blob, 0)),
            (chunk_topic(t.sha256, 1), huge),
            (chunk_topic(t.sha256, 2), _chunk(blob, 2)),
            (meta_topic(t.sha256), meta.to_json()),
        ],
    )
    seen: list[int] = []
    task = asyncio.create_task(_fetcher(tmp_path, mosquitto).fetch(t, progress=seen.append))
    await _until(lambda: seen and seen[-1] == C)
    await asyncio.sleep(1.0)
    assert not task.done() and seen[-1] == C  # chunk 1 never arrived: waiting, not refused
    await _pub(mosquitto, [(chunk_topic(t.sha256, 1), _chunk(blob, 1))])
    path = await asyncio.wait_for(task, 20)
    assert path.read_bytes() == blob


async def test_meta_disagreeing_with_target_refused(tmp_path: Path, mosquitto: Any) -> None:
    _, meta, t = _blob(3 * C)
    lying = BundleMeta.plan(2 * C, meta.sha256, C)
    await _pub(mosquitto, [(meta_topic(t.sha256), lying.to_json())])
    with pytest.raises(TrustError) as ei:
        await asyncio.wait_for(_fetcher(tmp_path, mosquitto).fetch(t, progress=print), 20)
    assert ei.value.code == "bad_meta"


async def test_url_source_resumes_with_range(tmp_path: Path, mosquitto: Any) -> None:
    blob, _, t0 = _blob(10 * C + 7)
    srv = RangeServer(blob)
    try:
        t = Target("m", "1.0.0", t0.sha256, t0.size, srv.url)
        srv.cut = 3 * C + 5  # the first connection drops part-way
        seen: list[int] = []
        path = await asyncio.wait_for(
            _fetcher(tmp_path, mosquitto).fetch_url(t, progress=seen.append), 30
        )
        assert path.read_bytes() == blob
        assert srv.requests == [None, f"bytes={3 * C + 5}-"]  # resumed, not restarted

        # a server that ignores Range: the partial file is restarted, the result is right
        path.unlink()
        srv.ranges = False
        srv.cut = 2 * C
        path = await asyncio.wait_for(
            _fetcher(tmp_path, mosquitto).fetch_url(t, progress=seen.append), 30
        )
        assert path.read_bytes() == blob

        # bytes that do not hash to the signed sha256: refused
        srv.data = blob[:-1] + bytes([blob[-1] ^ 1])
        with pytest.raises(TransferError) as ei:
            await asyncio.wait_for(
                _fetcher(tmp_path / "x", mosquitto).fetch_url(t, progress=seen.append), 30
            )
        assert ei.value.code == "hash_mismatch"
    finally:
        srv.close()
