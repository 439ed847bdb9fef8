"""A `BundleFetcher` for the fetch tests, its MQTT client made by the fetcher when needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiomqtt

from edgerund.twin.fetch import BundleFetcher, connect_properties


def make_fetcher(root: Path, broker: Any, chunk_max: int, **kw: Any) -> BundleFetcher:
    """Fetches into `root` with 1 MiB and 1 h limits; `broker` None: a test that must never
    reach the broker (the client factory fails the test if asked)."""

    async def client() -> aiomqtt.Client:
        if broker is None:
            raise AssertionError("no broker in this test")
        return aiomqtt.Client(
            broker.host,
            broker.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            properties=connect_properties(chunk_max),
        )

    return BundleFetcher(
        root, max_bytes=1 << 20, chunk_max=chunk_max, ttl_s=3600, client=client, **kw
    )
