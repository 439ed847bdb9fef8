"""The "models" component: atomic swaps, failed swaps keep the old model, start-up sources."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from edgerund.config.schema import Config
from edgerund.context import EventBus
from edgerund.errors import ConfigError
from edgerund.inference import ModelError, ModelRunner
from edgerund.inference.component import ModelsComponent, build
from edgerund.inference.config import ModelConfig, cross_check
from edgerund.inference.registry import ModelRegistry, default_loader
from edgerund.ports import ModelCounters, SlotRecord
from tests.inference.conftest import REF, copy_reference, edit_manifest, install_model, tiny_onnx


def _cfg(tmp_path: Path, models: list[dict[str, Any]]) -> Config:
    return msgspec.convert(
        {
            "gateway": {"id": "gw"},
            "paths": {"state_dir": str(tmp_path / "state")},
            "models": models,
        },
        Config,
    )


class FakeSlots:
    """A `ports.SlotSource`: the active slot "b" of each model it manages."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    def active(self, name: str) -> SlotRecord | None:
        d = self.dirs.get(name)
        if d is None:
            return None
        return SlotRecord(
            name=name, active_slot="b", version="1.1.0", state="committed", model_dir=d
        )


class FakeIdentity:
    """A `ports.Measurer` that records what it was asked to bind."""

    def __init__(self) -> None:
        self.bound: list[tuple[bytes, str]] = []
        self.overlays: list[bytes | None] = []

    async def bind_model(
        self,
        digest: bytes,
        name: str = "",
        *,
        overlay_sha256: bytes | None = None,
        overlay_version: str | None = None,
    ) -> None:
        self.bound.append((digest, name))
        self.overlays.append(overlay_sha256)


def _feeds() -> dict[str, np.ndarray]:
    with np.load(REF / "golden.npz") as z:
        return {
            "accel_g": z["accel_g"][0],
            "temp_c": z["temp_c"][0],
            "current_a": z["current_a"][0],
        }


def _fast_cfg(name: str = "motor", path: Path = REF) -> ModelConfig:
    return ModelConfig(name=name, path=str(path), warmup_runs=3)


async def test_swap_is_atomic_and_never_blocks_the_loop(tmp_path: Path) -> None:
    """While the new model loads (slowly, in a thread), every lookup on the loop returns
    the old, fully working runner; right after swap() returns, the new one."""
    new_dir = copy_reference(tmp_path / "v2")
    edit_manifest(new_dir, lambda d: d.update(version="9.0.0"))

    def slow_loader(d: Path, cfg: ModelConfig) -> ModelRunner:
        time.sleep(0.3)  # a big model: loading takes a while, in the worker thread
        return default_loader(d, cfg)

    reg = ModelRegistry([_fast_cfg()], loader=slow_loader)
    old = await reg.load("motor", REF)
    feeds = _feeds()
    seen: list[str] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            r = reg.runner("motor")
            assert r is not None
            res = r.infer(feeds)  # whatever we see is complete and usable
            assert res.ok, res.fault
            seen.append(r.version)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    t0 = time.monotonic()
    new = await reg.swap("motor", new_dir)
    stop.set()
    await task
    assert time.monotonic() - t0 >= 0.3
    assert reg.runner("motor") is new and new is not old and new.version == "9.0.0"
    # The loop kept ticking on the old model during the load: no blocking, no gap.
    assert seen.count(old.version) >= 10, seen
    assert set(seen) <= {old.version, "9.0.0"}
    first_new = seen.index("9.0.0") if "9.0.0" in seen else len(seen)
    assert all(v == "9.0.0" for v in seen[first_new:])  # never back to the old one
    st = reg.stats("motor")
    assert st["state"] == "running" and st["swaps"] == 1 and st["version"] == "9.0.0"
    reg.close()


async def test_failed_swap_keeps_the_old_runner(tmp_path: Path) -> None:
    reg = ModelRegistry([_fast_cfg()])
    old = await reg.load("motor", REF)
    bad = copy_reference(tmp_path / "bad")
    tiny_onnx(tmp_path / "w48.onnx", 48)
    install_model(bad, tmp_path / "w48.onnx")
    with pytest.raises(ModelError, match="ABI mismatch"):
        await reg.swap("motor", bad)
    assert reg.runner("motor") is old
    assert old.infer(_feeds()).ok
    st = reg.stats("motor")
    assert (
        st["state"] == "running" and st["failed_swaps"] == 1 and "ABI mismatch" in st["last_error"]
    )
    with pytest.raises(ModelError, match="unknown model 'pump'"):
        await reg.swap("pump", REF)
    reg.close()


async def test_component_loads_from_updates_slot_and_binds_identity(tmp_path: Path) -> None:
    slot = copy_reference(tmp_path / "slot-b")
    edit_manifest(slot, lambda d: d.update(version="1.1.0"))
    cfg = _cfg(tmp_path, [{"name": "motor", "path": str(tmp_path / "missing"), "warmup_runs": 3}])
    ident = FakeIdentity()
    comp = build(cfg, slots=FakeSlots({"motor": slot}), measurer=ident, events=EventBus())
    assert isinstance(comp, ModelsComponent)
    async with comp:
        r = comp.runner("motor")
        assert r is not None and r.version == "1.1.0" and r.model_dir == slot
        digest = hashlib.sha256((slot / "manifest.json").read_bytes()).digest()
        assert ident.bound == [(digest, "motor-ae")]
        assert comp.status() == {
            "models": [
                {
                    "name": "motor",
                    "active_slot": "b",
                    "version": "1.1.0",
                    "state": "committed",
                    "provider": "CPUExecutionProvider",
                    "provider_fallbacks": [],
                }
            ]
        }
        rows = await comp.commands()["models"].handler({}, None)  # type: ignore[arg-type]
        assert rows[0]["source"] == "slot" and rows[0]["precision"] == "int8"
        assert rows[0]["faults"] == 0 and rows[0]["threshold"] == pytest.approx(r.threshold)

        # A swap (what updates does) is bound too, and shows up in stats.
        await comp.swap("motor", REF)
        assert comp.runner("motor").version == "2.0.0"  # type: ignore[union-attr]
        assert len(ident.bound) == 2
        assert comp.stats("motor")["swaps"] == 1
        # The ModelHost counters probation reads are the active runner's, from zero.
        assert comp.counters("motor") == ModelCounters(0, 0, 0, None)
        for _ in range(3):
            assert comp.runner("motor").infer(_feeds()).ok  # type: ignore[union-attr]
        c = comp.counters("motor")
        assert c.inferences == 3 and c.faults == 0 and c.nan_outputs == 0
        assert c.score_mean is not None and c.score_mean >= 0.0


async def test_component_uses_config_path_without_updates_and_refuses_bad_model(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, [{"name": "motor", "path": str(REF), "warmup_runs": 3}])
    async with ModelsComponent(cfg, slots=None, measurer=None, events=EventBus()) as comp:
        assert comp.runner("motor") is not None
        assert comp.status()["models"][0] == {
            "name": "motor",
            "active_slot": None,
            "version": "2.0.0",
            "state": "running",
            "provider": "CPUExecutionProvider",
            "provider_fallbacks": [],
        }

    junk = copy_reference(tmp_path / "junk")
    (tmp_path / "j.bin").write_bytes(b"not onnx at all")
    install_model(junk, tmp_path / "j.bin")
    cfg2 = _cfg(tmp_path, [{"name": "motor", "path": str(junk), "warmup_runs": 3}])
    with pytest.raises(ConfigError) as ei:
        async with ModelsComponent(cfg2, slots=None, measurer=None, events=EventBus()):
            pass
    assert str(ei.value).startswith("models[0].path: ")
    assert "not a loadable ONNX model" in str(ei.value)


async def test_broken_slot_falls_back_to_the_shipped_model(tmp_path: Path) -> None:
    slot = copy_reference(tmp_path / "slot")
    (slot / "model.onnx").write_bytes(b"corrupt")
    cfg = _cfg(tmp_path, [{"name": "motor", "path": str(REF), "warmup_runs": 3}])
    bus = EventBus()
    events: list[str] = []
    bus.subscribe(lambda ev: events.append(ev.kind))
    async with ModelsComponent(
        cfg, slots=FakeSlots({"motor": slot}), measurer=None, events=bus
    ) as comp:
        r = comp.runner("motor")
        assert r is not None and r.model_dir == REF
        assert events == ["model.load_failed"]
        assert comp.source["motor"] == "config"


def test_build_returns_none_without_models(tmp_path: Path) -> None:
    assert build(_cfg(tmp_path, []), slots=None, measurer=None, events=EventBus()) is None


def test_cross_check(tmp_path: Path) -> None:
    bad = copy_reference(tmp_path / "bad")
    edit_manifest(bad, lambda d: d.pop("threshold"))
    cfg = _cfg(
        tmp_path,
        [
            {"name": "a", "path": str(REF)},
            {"name": "a", "path": str(REF)},
            {"name": "b", "path": str(tmp_path / "nowhere")},
            {"name": "c", "path": str(bad)},
        ],
    )
    errs = dict(cross_check(cfg))
    assert "models[0].name" not in errs and "models[0].path" not in errs
    assert "got 'a' (also models[0])" in errs["models[1].name"]
    assert "not a directory" in errs["models[2].path"]
    assert "threshold: missing" in errs["models[3].path"]
