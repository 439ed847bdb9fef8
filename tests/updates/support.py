"""Test support: a publisher (keys, keyring, bundles) and stand-ins that implement the
ports the updates component is given (ports.ModelHost: runner/swap/counters,
ports.LoopStats: counters).

The stand-ins are real implementations of those interfaces on onnxruntime (no mocking of
our own internals): the models registry loads `model.onnx` from a slot directory in a
thread and swaps atomically; the loop ticks on absolute deadlines, runs the active runner
every tick and counts missed ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerund.config.schema import Config
from edgerund.context import EventBus, Supervisor
from edgerund.ports import Counter, LoopCounters, ModelCounters, ModelPins, SlotSource
from edgerund.publisher import build as B
from edgerund.updates.component import UpdatesComponent, build
from edgerund.updates.counter import counter_for
from edgerund.updates.repository import SlotRepository, build_slots
from tests.updates import models as M


class Publisher:
    def __init__(self, n_keys: int = 3, threshold: int = 2) -> None:
        self.keys = [Ed25519PrivateKey.generate() for _ in range(n_keys)]
        self.threshold = threshold
        self.keyring_doc = B.make_keyring(
            [k.public_key() for k in self.keys],
            threshold=threshold,
            version=1,
            signers=self.keys[:threshold],
        )

    def write_keyring(self, path: Path) -> Path:
        path.write_bytes(B.keyring_bytes(self.keyring_doc))
        return path

    def files(
        self,
        model: bytes,
        golden: bytes | None = None,
        extra: Mapping[str, bytes] | None = None,
        golden_inputs: Mapping[str, Any] | None = None,
    ) -> dict[str, bytes]:
        if golden is None:
            golden = B.make_golden(model, n=4, inputs=golden_inputs)
        f = {"model.onnx": model, "golden-io.npz": golden}
        f.update(extra or {})
        return f

    def manifest(
        self, files: Mapping[str, bytes], *, version: str, counter: int, name: str = "m1", **kw: Any
    ) -> dict[str, Any]:
        health = {"probation_s": 0.3, "latency_p95_ms": 500.0, "max_rel_latency": 1000.0}
        health.update(kw.pop("health", {}))
        model = files["model.onnx"]
        return B.make_manifest(
            model_name=name,
            version=version,
            security_counter=counter,
            files=files,
            io_signature=B.io_signature_of(model),
            health=health,
            **kw,
        )

    def bundle(
        self,
        out: Path,
        *,
        version: str,
        counter: int,
        model: bytes | None = None,
        name: str = "m1",
        signers: list[Ed25519PrivateKey] | None = None,
        files: dict[str, bytes] | None = None,
        manifest: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Path:
        files = (
            files if files is not None else self.files(model if model is not None else M.affine())
        )
        man = (
            manifest
            if manifest is not None
            else self.manifest(files, version=version, counter=counter, name=name, **kw)
        )
        B.write_bundle(
            out, man, files, signers if signers is not None else self.keys[: self.threshold]
        )
        return out


def sha_tree(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def seed_dir(d: Path, model: bytes, version: str = "1.0.0") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(model)
    (d / "manifest.json").write_text(json.dumps({"name": "m1", "version": version}))
    return d


class Runner:
    def __init__(self, model_dir: Path) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.dir = model_dir
        self.sess = ort.InferenceSession(
            str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"]
        )
        mk = model_dir / "slot.json"
        self.version = json.loads(mk.read_text())["version"] if mk.exists() else "?"

    def infer(self, x: np.ndarray) -> float:
        return float(self.sess.run(None, {"x": x})[0].reshape(-1)[0])


class StandInModels:
    """A models host (ports.ModelHost): loads each model from its verified slot."""

    name = "models"

    def __init__(self, cfg: Config, slots: SlotSource | None) -> None:
        self.cfg = cfg
        self.slots = slots
        self.runners: dict[str, Runner] = {}
        self.counts: dict[str, dict[str, Any]] = {}
        self.swaps = 0

    async def __aenter__(self) -> StandInModels:
        for mc in self.cfg.models:
            rec = self.slots.active(mc.name) if self.slots is not None else None
            d = rec.model_dir if rec is not None else None
            self.runners[mc.name] = await asyncio.to_thread(Runner, Path(d or mc.path))
            self.counts[mc.name] = {"faults": 0, "nan_outputs": 0, "inferences": 0, "scores": []}
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def runner(self, name: str) -> Any:
        return self.runners.get(name)

    async def swap(self, name: str, model_dir: Path) -> None:
        new = await asyncio.to_thread(Runner, Path(model_dir))
        self.runners[name] = new
        self.counts[name]["scores"] = []
        self.swaps += 1

    def infer(self, name: str, x: np.ndarray) -> None:
        c = self.counts[name]
        try:
            s = self.runners[name].infer(x)
        except Exception:
            c["faults"] += 1
            return
        c["inferences"] += 1
        if not math.isfinite(s):
            c["nan_outputs"] += 1
            return
        c["scores"] = (c["scores"] + [s])[-100:]

    def counters(self, name: str) -> ModelCounters:
        c = self.counts[name]
        sc = c["scores"]
        return ModelCounters(
            inferences=c["inferences"],
            faults=c["faults"],
            nan_outputs=c["nan_outputs"],
            score_mean=float(np.mean(sc)) if sc else None,
        )


class StandInLoop:
    """A control loop (ports.LoopStats): every period it feeds `feed` to the active runner
    of `model`."""

    name = "loops"

    def __init__(self, models: StandInModels, model: str = "m1", period_s: float = 0.01) -> None:
        self.models = models
        self.model = model
        self.period_s = period_s
        self.feed = np.full((1, 4), 0.5, np.float32)
        # While the active runner has this version the loop runs its fallback instead of the
        # model (its input refused, a sensor unplugged): the model sees no inference.
        self.fallback_for: str | None = None
        self.ticks = 0
        self.missed = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StandInLoop:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        nxt = loop.time() + self.period_s
        while True:
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            now = loop.time()
            if now - nxt > self.period_s:  # a whole period late: ticks were missed
                skipped = int((now - nxt) // self.period_s)
                self.missed += skipped
                nxt += skipped * self.period_s
            if self.models.runner(self.model).version != self.fallback_for:
                self.models.infer(self.model, self.feed)
            self.ticks += 1
            nxt += self.period_s

    def counters(self) -> LoopCounters:
        return LoopCounters(ticks=self.ticks, missed=self.missed, overruns=0)


def make_config(
    tmp: Path,
    *,
    updates: dict[str, Any] | None = None,
    model_path: Path | None = None,
    hardware_id: str = "gw-test",
) -> Config:
    u = {
        "enabled": True,
        "keyring_file": str(tmp / "keyring.json"),
        "probation_s": 0.3,
        "precheck_timeout_s": 30.0,
        "precheck_runs": 20,
        "probation": {"max_missed_ticks": 1_000_000, "poll_interval_ms": 50},
    }
    u.update(updates or {})
    return msgspec.convert(
        {
            "gateway": {"id": "gw1", "hardware_id": hardware_id},
            "paths": {"state_dir": str(tmp / "state"), "run_dir": str(tmp / "run")},
            "models": [{"name": "m1", "path": str(model_path or tmp / "shipped")}],
            "updates": u,
        },
        Config,
    )


def make_supervisor() -> Supervisor:
    def on_fatal(exc: Exception) -> None:
        raise exc

    return Supervisor(on_fatal)


async def wait_for(pred: Any, timeout_s: float = 30.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


class Running:
    """The updates stack wired as the composition root wires it: slots (recovery) ->
    models host -> loop -> updates component (in its task scope)."""

    slots: SlotRepository
    models: StandInModels
    loop: StandInLoop
    updates: UpdatesComponent
    events: EventBus
    supervisor: Supervisor


@contextlib.asynccontextmanager
async def running(
    cfg: Config,
    *,
    with_loop: bool = True,
    counter: Counter | None = None,
    pins: ModelPins | None = None,
) -> AsyncIterator[Running]:
    r = Running()
    r.events = EventBus()
    slots = build_slots(cfg, events=r.events)
    assert slots is not None
    r.slots = slots
    async with contextlib.AsyncExitStack() as stack:
        r.supervisor = await stack.enter_async_context(make_supervisor())
        await stack.enter_async_context(slots)
        r.models = await stack.enter_async_context(StandInModels(cfg, slots))
        r.loop = StandInLoop(r.models)
        if with_loop:
            await stack.enter_async_context(r.loop)
        scope = await stack.enter_async_context(r.supervisor.scope("updates"))
        r.updates = build(
            cfg,
            slots=slots,
            scope=scope,
            events=r.events,
            counter=counter if counter is not None else counter_for(cfg, None),
            models=r.models,
            loops=r.loop if with_loop else None,
            router=None,
            pins=pins,
        )
        await stack.enter_async_context(r.updates)
        yield r
