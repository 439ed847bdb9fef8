"""Issue #12 items 1 and 6 through the running updates component: every bundle source is
rate-limited (`rate_limited` before the file is opened; the inbox waits instead), and an
untrustworthy anti-rollback counter refuses updates with its reason while the daemon and
its models keep running."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgerund.component import CommandError, Peer
from edgerund.updates.counter import RefusedCounter
from edgerund.updates.ratelimit import SourceLimiter, source_of
from tests.updates.support import Publisher, wait_for

ROOT = Peer(pid=1, uid=0, gid=0, privileged=True)
USER = Peer(pid=2, uid=1000, gid=1000)


def test_bucket_refills_and_keys_are_separate() -> None:
    now = [0.0]
    lim = SourceLimiter(per_min=60.0, burst=2, clock=lambda: now[0])
    assert lim.take("inbox") == 0.0 and lim.take("inbox") == 0.0
    wait = lim.take("inbox")
    assert 0.9 < wait <= 1.0  # one token a second
    assert lim.take("mqtt") == 0.0  # another source has its own bucket
    now[0] += 1.0
    assert lim.take("inbox") == 0.0
    assert lim.refused == {"inbox": 1}
    assert SourceLimiter(per_min=0, burst=1).take("x") == 0.0  # 0 = off
    assert [source_of(s) for s in ("socket:0", "inbox:a.tar", "mqtt:T1")] == [
        "socket:0",
        "inbox",
        "mqtt",
    ]


async def _code(h: Any, path: Path, peer: Peer = ROOT) -> str:
    with pytest.raises(CommandError) as ei:
        await h.updates.commands()["update"].handler({"path": str(path)}, peer)
    return ei.value.code


async def test_socket_is_rate_limited_per_uid(harness: Any, tmp_path: Path) -> None:
    async with harness(updates={"source_per_min": 1, "source_burst": 2}) as h:
        missing = tmp_path / "nope.bundle"
        assert [await _code(h, missing) for _ in range(3)] == [
            "not_found",
            "not_found",
            "rate_limited",
        ]
        assert await _code(h, missing, USER) == "not_found"  # another uid, its own bucket
        st = h.updates.status()["updates"]
        assert st["rate_limit"]["refused"] == {"socket:0": 1}
        assert st["recent_rejections"][-2]["reason"] == "rate_limited"


async def test_mqtt_commit_over_the_limit_is_refused(
    harness: Any, tmp_path: Path, publisher: Publisher
) -> None:
    data = b"not a bundle" * 100
    sha = hashlib.sha256(data).hexdigest()

    async def send(h: Any, hdr: dict[str, Any], body: bytes = b"") -> dict[str, Any]:
        out = await h.updates.mqtt_handler(json.dumps(hdr).encode() + b"\n" + body)
        return dict(json.loads(out))

    async with harness(updates={"source_per_min": 1, "source_burst": 1}) as h:
        replies = []
        for tid in ("t1", "t2"):
            await send(h, {"op": "begin", "id": tid, "size": len(data), "sha256": sha})
            await send(h, {"op": "chunk", "id": tid, "offset": 0}, data)
            replies.append(await send(h, {"op": "commit", "id": tid}))
        assert replies[0]["ok"] is True
        assert replies[1]["ok"] is False and replies[1]["error"]["code"] == "rate_limited"
        transfers = tmp_path / "state" / "updates" / "transfers"
        await wait_for(lambda: not any(transfers.glob("*.part")))  # nothing left behind


async def test_inbox_over_the_limit_waits_instead_of_refusing(harness: Any, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for n in ("a.tar", "b.tar"):
        (inbox / n).write_bytes(b"\x01" * 1024)
    cfg = {"inbox_dir": str(inbox), "inbox_poll_ms": 50, "source_per_min": 60, "source_burst": 1}
    async with harness(updates=cfg) as h:

        def reasons() -> dict[str, str]:
            return {
                r["source"]: r["reason"] for r in h.updates.status()["updates"]["recent_rejections"]
            }

        t0 = time.monotonic()
        await wait_for(lambda: len(reasons()) == 2, timeout_s=20)
        # The second file waited for a token (about a second) and was then read.
        assert reasons() == {"inbox:a.tar": "bundle_malformed", "inbox:b.tar": "bundle_malformed"}
        assert time.monotonic() - t0 >= 0.8


async def test_counter_refusal_refuses_updates_but_runs(
    harness: Any, tmp_path: Path, publisher: Publisher
) -> None:
    reason = "the TPM was missing at boot (identity fell back to software)"
    async with harness(counter=RefusedCounter(reason)) as h:
        st = h.updates.status()["updates"]
        assert st["counter_refused"] == reason
        assert st["refused"]["reason"] == "counter_unavailable"
        assert reason in st["refused"]["message"]
        b = publisher.bundle(tmp_path / "v2.bundle", version="2.0.0", counter=1)
        assert await _code(h, b) == "counter_unavailable"
        assert h.models.runner("m1").version == "1.0.0"  # the model keeps running
        assert h.record().state == "IDLE"
