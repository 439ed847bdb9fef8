from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from edgerund.updates.component import UpdatesComponent
from tests.updates import models as M
from tests.updates.support import (
    Publisher,
    StandInLoop,
    StandInModels,
    make_config,
    running,
    seed_dir,
)


@pytest.fixture(scope="session")
def publisher() -> Publisher:
    return Publisher()


class Harness:
    def __init__(self, tmp: Path, publisher: Publisher) -> None:
        self.tmp = tmp
        self.pub = publisher
        self.updates: UpdatesComponent
        self.models: StandInModels
        self.loop: StandInLoop

    @property
    def store(self) -> Any:
        return self.updates.stores["m1"]

    def current(self) -> str:
        import os

        return os.readlink(self.store.current)

    def record(self) -> Any:
        return self.updates.records["m1"]


@pytest.fixture
def harness(tmp_path: Path, publisher: Publisher) -> Callable[..., Any]:
    """Factory: `async with harness(updates={...}) as h:` runs updates + models + loop."""

    @contextlib.asynccontextmanager
    async def make(
        updates: dict[str, Any] | None = None,
        shipped: bytes | None = None,
        with_loop: bool = True,
        counter: Any = None,
    ) -> AsyncIterator[Harness]:
        h = Harness(tmp_path, publisher)
        if not (tmp_path / "shipped").exists():
            seed_dir(tmp_path / "shipped", shipped if shipped is not None else M.affine())
        if not (tmp_path / "keyring.json").exists():
            publisher.write_keyring(tmp_path / "keyring.json")
        cfg = make_config(tmp_path, updates=updates)
        async with running(cfg, with_loop=with_loop, counter=counter) as r:
            h.updates = r.updates
            h.models = r.models
            h.loop = r.loop
            yield h

    return make
