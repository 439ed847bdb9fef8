"""Peers for in-process control-loop tests that implement the ports the loops take:
`ScenarioHub` is a `ports.SampleSource`, `Models` a `ports.ModelHost`.

`ScenarioHub` samples the shared simulated plant (drivers/emulated/scenario.py) into the
hub's own ring buffers (edgerund/hub/ring.py) at each sensor's rate, like the real hub's
acquisition does with an emulated device behind it; a test can fail a sensor (it stops
delivering and reports "failed"). `OnnxRunner` runs a real ONNX graph (built here with
onnx.helper) through onnxruntime and reports like the ModelRunner contract
(score, ok, fault, infer_us), so the loop is exercised with a real model call.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from drivers.base import Sample
from drivers.emulated.scenario import Scenario
from edgerund.hub.ring import Ring
from edgerund.ports import ModelCounters


@dataclass
class FakeSensor:
    rate_hz: float
    channels: dict[str, Callable[[np.ndarray], np.ndarray]]
    state: str = "ok"
    rings: dict[str, Ring] = field(default_factory=dict)


class ScenarioHub:
    def __init__(self, scenario: Scenario, capacity: int = 2048) -> None:
        self.scenario = scenario
        self.t_start = time.monotonic()
        self.sensors: dict[str, FakeSensor] = {}
        self.capacity = capacity
        self.resources = None
        self._task: asyncio.Task[None] | None = None

    def add(
        self, sid: str, rate_hz: float, channels: dict[str, Callable[[np.ndarray], np.ndarray]]
    ) -> None:
        s = FakeSensor(rate_hz, channels)
        s.rings = {ch: Ring(self.capacity) for ch in channels}
        self.sensors[sid] = s

    @classmethod
    def motor(cls, scenario: Scenario, imu_hz: float = 200.0) -> ScenarioHub:
        hub = cls(scenario)
        hub.add(
            "imu",
            imu_hz,
            {
                "ax": lambda t: scenario.vibration_g(t)[:, 0],
                "ay": lambda t: scenario.vibration_g(t)[:, 1],
                "az": lambda t: scenario.vibration_g(t)[:, 2],
            },
        )
        hub.add("cabinet", 10.0, {"temp_c": scenario.cabinet_temp_c})
        return hub

    def now_s(self) -> float:
        return time.monotonic() - self.t_start

    # --- the hub interface the loops use ---
    def window(self, sensor_id: str, channel: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sensors[sensor_id].rings[channel].window(n)

    def state(self, sensor_id: str) -> str:
        return self.sensors[sensor_id].state

    def channels(self) -> list[tuple[str, str, str]]:
        return [(sid, ch, "") for sid, s in self.sensors.items() for ch in s.channels]

    def latest(self, sensor_id: str, channel: str) -> Sample | None:
        ring = self.sensors[sensor_id].rings[channel]
        if len(ring) == 0:
            return None
        t, v = ring.window(1)
        return Sample(sensor_id, channel, float(t[0]), time.time(), float(v[0]), "")

    def subscribe(self, fn: Callable[[Sample], None]) -> Callable[[], None]:
        # The loops read windows; nothing here pushes samples to subscribers.
        return lambda: None

    # --- acquisition: every sample whose nominal time has passed, like a device FIFO ---
    def prefill(self, seconds: float) -> None:
        """Samples for the last `seconds` (as if the hub had been running)."""
        now = time.monotonic()
        for s in self.sensors.values():
            n = int(seconds * s.rate_hz)
            t_mono = now - (np.arange(n, 0, -1) - 1) / s.rate_hz
            self._push(s, t_mono)

    def _push(self, s: FakeSensor, t_mono: np.ndarray) -> None:
        t_scn = t_mono - self.t_start
        for ch, fn in s.channels.items():
            vals = fn(t_scn)
            ring = s.rings[ch]
            for tm, v in zip(t_mono, vals, strict=True):
                ring.push(float(tm), float(v))

    async def run(self) -> None:
        last = {sid: time.monotonic() for sid in self.sensors}
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            for sid, s in self.sensors.items():
                if s.state != "ok":
                    last[sid] = now
                    continue
                k = math.floor((now - last[sid]) * s.rate_hz)
                if k <= 0:
                    continue
                t = last[sid] + np.arange(1, k + 1) / s.rate_hz
                last[sid] = float(t[-1])
                self._push(s, t)

    async def __aenter__(self) -> ScenarioHub:
        self.prefill(2.0)
        self._task = asyncio.create_task(self.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def variance_model(window: int, *, nan: bool = False) -> bytes:
    """ONNX: score = mean over axes of the per-axis variance of a (window, 3) window.

    With `nan=True` the graph takes the square root of the negated score: NaN for any
    non-constant input (a model that produces garbage)."""
    x = helper.make_tensor_value_info("vibration", TensorProto.FLOAT, [window, 3])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, [])
    axes0 = helper.make_tensor("axes0", TensorProto.INT64, [1], [0])
    nodes = [
        helper.make_node("ReduceMean", ["vibration", "axes0"], ["mu"], keepdims=1),
        helper.make_node("Sub", ["vibration", "mu"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], keepdims=0),
    ]
    out = "var"
    if nan:
        nodes += [
            helper.make_node("Neg", ["var"], ["nvar"]),
            helper.make_node("Sqrt", ["nvar"], ["sq"]),
        ]
        out = "sq"
    nodes.append(helper.make_node("Identity", [out], ["score"]))
    graph = helper.make_graph(nodes, "variance", [x], [y], initializer=[axes0])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class InferResult:
    score: float
    ok: bool
    fault: str | None
    infer_us: float


class OnnxRunner:
    def __init__(self, model: bytes, manifest: dict[str, Any]) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.manifest = manifest
        self.calls = 0

    def infer(self, inputs: Mapping[str, np.ndarray]) -> InferResult:
        t0 = time.perf_counter()
        (out,) = self.session.run(None, dict(inputs))
        us = (time.perf_counter() - t0) * 1e6
        self.calls += 1
        score = float(np.asarray(out).reshape(-1)[0])
        if not math.isfinite(score):
            return InferResult(score, False, f"non-finite output {score}", us)
        return InferResult(score, True, None, us)


def manifest(
    window: int, threshold: float, version: str = "1.0.0", name: str = "vib"
) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "inputs": [{"name": "vibration", "shape": [window, 3], "dtype": "float32", "rate_hz": 200}],
        "threshold": threshold,
    }


class Models:
    """A `ports.ModelHost`: `runner(name)`; tests swap by assignment to `runners`."""

    def __init__(self, **runners: Any) -> None:
        self.runners: dict[str, Any] = dict(runners)

    def runner(self, name: str) -> Any:
        return self.runners.get(name)

    async def swap(self, name: str, model_dir: Path) -> None:
        raise AssertionError("the loops never swap models")

    def counters(self, name: str) -> ModelCounters:
        calls = getattr(self.runners.get(name), "calls", 0)
        return ModelCounters(inferences=calls, faults=0, nan_outputs=0, score_mean=None)
