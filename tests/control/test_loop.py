"""Control loops in-process: real component, real ONNX model call, hub fed by the scenario.

Every test builds the `loops` component (edgerund/control/component.py) with the ports the
daemon's root gives it: `ScenarioHub` (tests/control/fakes.py) as the SampleSource, `Models`
as the ModelHost, an event bus, a task scope, and the production actuator drivers plus the
emulated actuator (as in simulated mode), which records what the loop commanded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from drivers.emulated import actuator as emulated_actuator
from drivers.emulated.actuator import EmulatedActuator
from drivers.emulated.scenario import Anomaly, Scenario
from drivers.registry import actuator_drivers
from edgerund.config.schema import Config
from edgerund.context import Event, EventBus
from edgerund.control.component import LoopsComponent, build
from edgerund.control.config import cross_check
from edgerund.errors import ConfigError, DeviceError
from tests.control.fakes import Models, OnnxRunner, ScenarioHub, manifest, variance_model
from tests.helpers.wiring import task_scope

WINDOW = 128
REF_MODEL = Path(__file__).resolve().parents[2] / "models" / "reference"
THRESHOLD = 0.001  # normal windows score <= ~0.0008, bearing wear >= ~0.0012 (seed 1)
ACTIVE, NORMAL, SAFE = 1.0, 0.0, 0.5  # distinct so the test can tell them apart


def loop_cfg(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "id": "motor",
        "period_ms": 20,
        "model": "vib",
        "inputs": [
            {"name": "vibration", "sensor": "imu", "channels": ["ax", "ay", "az"], "window": WINDOW}
        ],
        "policy": {"on_ticks": 3, "off_ticks": 5, "hysteresis_ratio": 0.2},
        "fallback": [{"sensor": "cabinet", "channel": "temp_c", "stat": "last", "above": 60.0}],
        "actuator": {"driver": "emulated", "name": "relay", "safe_value": SAFE},
        "active_value": ACTIVE,
        "normal_value": NORMAL,
        "stale_after_ms": 200,
        "spin_us": 0,
    }
    cfg.update(over)
    return cfg


class LoopEnv:
    """The config and event bus the root would hand the loops."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.events = EventBus()


def make_ctx(loops: list[dict[str, Any]], models: list[str] = ("vib",)) -> LoopEnv:  # type: ignore[assignment]
    config = msgspec.convert(
        {
            "gateway": {"id": "gw-test"},
            "loops": loops,
            "models": [{"name": m, "path": "/nonexistent"} for m in models],
        },
        Config,
    )
    return LoopEnv(config)


ACTUATORS = {**actuator_drivers(), "emulated": emulated_actuator.ACTUATOR}


@contextlib.asynccontextmanager
async def running(
    ctx: LoopEnv, hub: ScenarioHub, models: Models | None
) -> AsyncIterator[tuple[LoopsComponent, list[Event]]]:
    events: list[Event] = []
    ctx.events.subscribe(events.append)
    async with hub, task_scope("loops") as scope:
        comp = build(
            ctx.config,
            samples=hub,
            resources=hub.resources,
            models=models,
            events=ctx.events,
            scope=scope,
            actuators=ACTUATORS,
        )
        assert comp is not None
        async with comp:
            yield comp, events


def actuator_of(comp: LoopsComponent, i: int = 0) -> EmulatedActuator:
    drv = comp.loops[i].actuator
    assert isinstance(drv, EmulatedActuator)
    return drv


async def wait_for(pred: Any, timeout_s: float, step_s: float = 0.02) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(step_s)
    return bool(pred())


def vib_models(**kw: Any) -> Models:
    return Models(vib=OnnxRunner(variance_model(WINDOW, **kw), manifest(WINDOW, THRESHOLD)))


async def test_injected_bearing_anomaly_detected_then_released(tmp_path: Path) -> None:
    scenario = Scenario(seed=1)
    hub = ScenarioHub.motor(scenario)
    rec = tmp_path / "relay.jsonl"
    ctx = make_ctx(
        [
            loop_cfg(
                actuator={
                    "driver": "emulated",
                    "name": "relay",
                    "safe_value": SAFE,
                    "record_path": str(rec),
                }
            )
        ]
    )
    async with running(ctx, hub, vib_models()) as (comp, events):
        act = actuator_of(comp)
        loop = comp.loops[0]
        assert act.commands[0][2] == SAFE  # safe state written before the first tick
        assert await wait_for(lambda: loop.mode is not None and act.value == NORMAL, 3.0)
        assert loop.status()["mode"] == "model"
        assert not any(e.kind == "anomaly.start" for e in events)

        # at the start event, the scores of the ticks that led to it (debounce check)
        at_start: list[list[float | None]] = []
        ctx.events.subscribe(
            lambda e: at_start.append(list(loop.scores)) if e.kind == "anomaly.start" else None
        )
        start_s = hub.now_s() + 0.3
        scenario.add_anomaly(Anomaly("bearing_wear", start_s=start_s, duration_s=1.5, severity=1.0))
        assert await wait_for(lambda: act.value == ACTIVE, 4.0)
        # the start came exactly on_ticks=3 consecutive ticks above the threshold
        recent = at_start[0]
        assert all(s is not None and s > THRESHOLD for s in recent[-3:]), recent[-6:]
        # and within the window fill (128 samples at 200 Hz = 0.64 s) + on_ticks, with 1.5 s
        # of slack for a CPU shared with other test runs
        t_active = next(tm for tm, _tw, v in act.commands if v == ACTIVE)
        delay_s = (t_active - hub.t_start) - start_s
        assert 0 < delay_s <= WINDOW / 200.0 + 3 * 0.020 + 1.5, f"detected after {delay_s:.2f} s"
        start_ev = [e for e in events if e.kind == "anomaly.start"]
        assert len(start_ev) == 1 and start_ev[0].source == "motor"
        f = start_ev[0].fields
        assert f["score"] > THRESHOLD and f["threshold"] == THRESHOLD
        assert f["window"]["vibration"]["channels"] == ["ax", "ay", "az"]
        assert len(f["window"]["vibration"]["last"][0]) == 32

        # released after the anomaly ends (window drains + off_ticks)
        assert await wait_for(
            lambda: act.value == NORMAL and any(e.kind == "anomaly.end" for e in events), 5.0
        )
        end_ev = next(e for e in events if e.kind == "anomaly.end")
        assert end_ev.t_mono - hub.t_start >= start_s + 1.5
        st = comp.status()["loops"][0]
        assert st["anomalies"] == 1 and st["ticks"] > 50  # missed ticks: see the benchmark
        assert st["lateness_ms"]["p50"] is not None and st["inference_us"]["p50"] > 0
        assert st["latency_ms"]["max"] is not None and st["model_version"] == "1.0.0"
        assert st["actuator"]["state"] == "ok" and st["actuator"]["value"] == NORMAL
    # on exit: safe state, and the JSON-lines record has every command in order
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    values = [x["value"] for x in lines]
    assert values[0] == SAFE and values[-1] == SAFE
    assert ACTIVE in values and values.index(ACTIVE) < len(values) - 1
    assert all(a["t_mono"] <= b["t_mono"] for a, b in itertools.pairwise(lines))


async def test_nan_model_output_switches_to_fallback() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    ctx = make_ctx([loop_cfg()])
    async with running(ctx, hub, vib_models(nan=True)) as (comp, events):
        loop = comp.loops[0]
        assert await wait_for(lambda: loop.ticks >= 5, 3.0)
        st = comp.status()["loops"][0]
        assert st["mode"] == "fallback"
        assert "non-finite" in st["reason"] and "vib" in st["reason"]
        assert st["model_faults"] >= 5 and st["fallback_ticks"] >= 5
        assert st["actuator"]["value"] == NORMAL  # cabinet temperature is below the rule limit
        fb = [e for e in events if e.kind == "loop.fallback"]
        assert fb and fb[0].fields["mode"] == "fallback" and "non-finite" in fb[0].fields["reason"]


async def test_fallback_rule_trips_actuator_when_model_missing() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    # rule limit below the normal cabinet temperature: the fallback must trip
    ctx = make_ctx(
        [
            loop_cfg(
                fallback=[
                    {
                        "sensor": "cabinet",
                        "channel": "temp_c",
                        "stat": "mean",
                        "samples": 5,
                        "above": -40.0,
                    }
                ]
            )
        ]
    )
    async with running(ctx, hub, Models()) as (comp, events):
        act = actuator_of(comp)
        assert await wait_for(lambda: act.value == ACTIVE, 3.0)
        st = comp.status()["loops"][0]
        assert st["mode"] == "fallback" and st["reason"] == "model vib: not loaded"
        start = next(e for e in events if e.kind == "anomaly.start")
        assert (
            start.fields["mode"] == "fallback"
            and "cabinet.temp_c mean=" in start.fields["rules"][0]
        )


async def test_failed_sensor_switches_to_fallback_then_safe() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    ctx = make_ctx([loop_cfg()])
    async with running(ctx, hub, vib_models()) as (comp, events):
        loop, act = comp.loops[0], actuator_of(comp)
        assert await wait_for(lambda: loop.mode is not None and loop.mode.value == "model", 3.0)
        hub.sensors["imu"].state = "failed"
        assert await wait_for(lambda: loop.mode is not None and loop.mode.value == "fallback", 2.0)
        assert loop.reason == "input vibration: sensor imu is failed"
        # the fallback's own sensor goes silent (not failed, just no new samples): stale -> safe
        hub.sensors["cabinet"].rate_hz = 1e-9  # state stays "ok"; staleness must catch it
        assert await wait_for(lambda: loop.mode is not None and loop.mode.value == "safe", 2.0)
        assert "stale" in (loop.reason or "") and "sensor imu is failed" in (loop.reason or "")
        assert act.value == SAFE
        modes = [e.fields["mode"] for e in events if e.kind == "loop.fallback"]
        assert modes[-3:] == ["model", "fallback", "safe"]
        # recovery: sensors back -> model mode again, visible as an event
        hub.sensors["imu"].state = "ok"
        hub.sensors["cabinet"].rate_hz = 10.0
        assert await wait_for(lambda: loop.mode is not None and loop.mode.value == "model", 3.0)
        assert act.value == NORMAL


async def test_shutdown_drives_actuators_to_safe_state() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    two = [
        loop_cfg(),
        loop_cfg(
            id="cab",
            model=None,
            inputs=[],
            period_ms=50,
            fallback=[{"sensor": "cabinet", "channel": "temp_c", "above": -100.0}],
            actuator={"driver": "emulated", "name": "fan", "safe_value": 7.0},
        ),
    ]
    ctx = make_ctx(two)
    async with running(ctx, hub, vib_models()) as (comp, _events):
        a0, a1 = actuator_of(comp, 0), actuator_of(comp, 1)
        assert await wait_for(lambda: a0.value == NORMAL and a1.value == ACTIVE, 3.0)
        # LoopStats sums the loops' tick counters (one read on the loop: no tick between)
        ticks = [lp.ticks for lp in comp.loops]
        assert comp.counters().ticks == sum(ticks) and min(ticks) > 0
    assert a0.value == SAFE and a0.commands[-1][2] == SAFE
    assert a1.value == 7.0 and a1.commands[-1][2] == 7.0
    assert not a0.is_open and not a1.is_open
    assert all(t.done() for t in comp.scope.tasks)


async def test_actuator_fault_counted_and_visible_never_crashes() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    # the 2nd write fails and every one after: safe state at start, then NORMAL fails
    ctx = make_ctx(
        [
            loop_cfg(
                actuator={
                    "driver": "emulated",
                    "name": "relay",
                    "safe_value": SAFE,
                    "fail_after_writes": 1,
                }
            )
        ]
    )
    async with running(ctx, hub, vib_models()) as (comp, _events):
        loop = comp.loops[0]
        assert await wait_for(lambda: loop.actuator_errors >= 4, 3.0)
        st = comp.status()["loops"][0]
        assert st["actuator"]["state"] == "failed" and "injected fault" in st["actuator"]["error"]
        assert st["ticks"] >= 2 and len(comp.scope.tasks) == 1
        # LoopStats (what probation reads) counts the same ticks as the status
        c = comp.counters()
        assert c.ticks >= st["ticks"] and c.missed == loop.missed >= 0
        assert not next(iter(comp.scope.tasks)).done()


async def test_model_swap_takes_effect_between_ticks() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    models = vib_models()
    ctx = make_ctx([loop_cfg()])
    async with running(ctx, hub, models) as (comp, _events):
        loop = comp.loops[0]
        assert await wait_for(lambda: loop.model_version == "1.0.0" and loop.ticks > 2, 3.0)
        # v2 with a threshold below every normal score: the loop must follow the new manifest
        v2 = OnnxRunner(variance_model(WINDOW), manifest(WINDOW, 1e-6, version="2.0.0"))
        models.runners["vib"] = v2
        act = actuator_of(comp)
        assert await wait_for(lambda: act.value == ACTIVE, 3.0)
        st = comp.status()["loops"][0]
        assert st["model_version"] == "2.0.0" and st["threshold"] == 1e-6
        # a swap to a model with another ABI: fallback with both sides named, no crash
        bad = OnnxRunner(variance_model(64), manifest(64, 1.0, version="3.0.0"))
        models.runners["vib"] = bad
        assert await wait_for(lambda: loop.mode is not None and loop.mode.value == "fallback", 2.0)
        assert "ABI mismatch" in (loop.reason or "") and "[64, 3]" in (loop.reason or "")
        assert bad.calls == 0


async def test_abi_mismatch_refused_at_start() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    models = Models(vib=OnnxRunner(variance_model(64), manifest(64, THRESHOLD)))
    ctx = make_ctx([loop_cfg()])
    with pytest.raises(ConfigError) as ei:
        async with running(ctx, hub, models):
            pass
    msg = str(ei.value)
    assert "loops[0].inputs" in msg and "[64, 3]" in msg and "window 128 x 3" in msg


async def test_unknown_channel_refused_at_start() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    ctx = make_ctx(
        [
            loop_cfg(
                inputs=[
                    {
                        "name": "vibration",
                        "sensor": "imu",
                        "channels": ["ax", "ay", "gz"],
                        "window": WINDOW,
                    }
                ]
            )
        ]
    )
    with pytest.raises(
        ConfigError, match=r"loops\[0\]\.inputs\[0\]\.channels: sensor 'imu' has no channel 'gz'"
    ):
        async with running(ctx, hub, vib_models()):
            pass


async def test_mqtt_actuator_publishes_command_events() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    ctx = make_ctx(
        [loop_cfg(actuator={"driver": "mqtt", "command": "conveyor_stop", "safe_value": SAFE})]
    )
    async with running(ctx, hub, vib_models()) as (_comp, events):
        assert await wait_for(lambda: sum(e.kind == "actuator.command" for e in events) >= 2, 3.0)
    cmds = [e for e in events if e.kind == "actuator.command"]
    assert cmds[0].fields == {"command": "conveyor_stop", "value": SAFE}
    assert cmds[1].fields["value"] == NORMAL and cmds[-1].fields["value"] == SAFE
    assert all(e.source == "motor" for e in cmds)


async def test_gpio_without_binding_is_a_clear_device_error() -> None:
    try:
        import gpiod  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gpiod is installed; this test checks the message when it is absent")
    hub = ScenarioHub.motor(Scenario(seed=1))
    ctx = make_ctx([loop_cfg(actuator={"driver": "gpio", "line": 17})])
    with pytest.raises(DeviceError, match=r"loops\[0\]\.actuator \(gpio\).*python3-libgpiod"):
        async with running(ctx, hub, vib_models()):
            pass


async def test_socket_command_and_status_shape() -> None:
    before = sys.getswitchinterval()
    hub = ScenarioHub.motor(Scenario(seed=1))
    ctx = make_ctx([loop_cfg()])
    async with running(ctx, hub, vib_models()) as (comp, _events):
        assert await wait_for(lambda: comp.loops[0].ticks > 3, 3.0)
        # the GIL hand-over interval is lowered while loops run, restored on exit
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        cmd = comp.commands()["loops"]
        assert not cmd.mutating
        from edgerund.component import CommandError, Peer

        peer = Peer(pid=1, uid=1000, gid=1000)
        out = await cmd.handler({}, peer)
        assert [x["id"] for x in out] == ["motor"]
        for key in ("period_ms", "ticks", "missed", "lateness_ms", "latency_ms", "mode", "scores"):
            assert key in out[0]
        assert set(out[0]["lateness_ms"]) == {"p50", "p99", "max"}
        json.dumps(out)  # JSON-able
        with pytest.raises(CommandError, match="no loop 'nope'"):
            await cmd.handler({"id": "nope"}, peer)
    assert sys.getswitchinterval() == pytest.approx(before)


def test_cross_check_errors_name_key_and_both_sides() -> None:
    cfg = msgspec.convert(
        {
            "gateway": {"id": "g"},
            "loops": [
                loop_cfg(model="nosuch"),
                loop_cfg(id="motor", fallback=[{"sensor": "ghost", "channel": "x"}]),
            ],
            "models": [{"name": "vib", "path": "/x"}],
        },
        Config,
    )
    errs = dict(cross_check(cfg))
    assert "unknown model 'nosuch' (expected one of: vib)" in errs["loops[0].model"]
    assert "duplicate loop id 'motor'" in errs["loops[1].id"]
    assert "unknown sensor 'ghost'" in errs["loops[1].fallback[0].sensor"]
    assert "needs `above` or `below`" in errs["loops[1].fallback[0]"]
    assert "output already driven by loop 'motor'" in errs["loops[1].actuator"]


def test_schema_rejects_out_of_range_period() -> None:
    with pytest.raises(msgspec.ValidationError, match="period_ms"):
        msgspec.convert({"gateway": {"id": "g"}, "loops": [loop_cfg(period_ms=0)]}, Config)
    with pytest.raises(msgspec.ValidationError, match="period_ms"):
        msgspec.convert({"gateway": {"id": "g"}, "loops": [loop_cfg(period_ms=1001)]}, Config)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the overflowing window
async def test_real_runner_non_finite_output_switches_to_fallback() -> None:
    """The reference model through the real ModelRunner: a vibration sensor glitching to
    1e300 g (finite, so it passes the input check) overflows the features; the runner
    reports the fault and the loop decides on the fallback rule, saying why."""
    from edgerund.inference.runner import ModelRunner

    runner = ModelRunner.load(REF_MODEL)
    scenario = Scenario(seed=42)
    hub = ScenarioHub(scenario)
    glitch = {"on": False}

    def axis(i: int) -> Any:
        def f(t: Any) -> Any:
            v = scenario.vibration_g(t)[:, i]
            return v * 1e300 if glitch["on"] else v

        return f

    hub.add("imu", 200.0, {"ax": axis(0), "ay": axis(1), "az": axis(2)})
    hub.add("cabinet", 10.0, {"temp_c": scenario.cabinet_temp_c})
    hub.add("motor", 10.0, {"current_a": scenario.motor_current_a})
    cfg = loop_cfg(
        model="ref",
        inputs=[
            {"name": "accel_g", "sensor": "imu", "channels": ["ax", "ay", "az"], "window": 256},
            {"name": "temp_c", "sensor": "cabinet", "channels": ["temp_c"], "window": 1},
            {"name": "current_a", "sensor": "motor", "channels": ["current_a"], "window": 1},
        ],
        policy={"on_ticks": 3, "off_ticks": 5},
    )
    ctx = make_ctx([cfg], models=["ref"])
    async with running(ctx, hub, Models(ref=runner)) as (comp, events):
        loop = comp.loops[0]
        assert await wait_for(lambda: loop.mode is not None and loop.mode.value == "model", 3.0)
        assert loop.policy.threshold == pytest.approx(runner.manifest.threshold)
        glitch["on"] = True
        assert await wait_for(lambda: loop.mode is not None and loop.mode.value == "fallback", 3.0)
        st = comp.status()["loops"][0]
        assert st["reason"].startswith("model ref: fault:"), st["reason"]
        assert st["model_faults"] >= 1
        fb = [e for e in events if e.kind == "loop.fallback" and e.fields["mode"] == "fallback"]
        assert fb and fb[0].fields["reason"].startswith("model ref: fault:")


async def test_reload_applies_policy_live() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    ctx = make_ctx([loop_cfg()])
    async with running(ctx, hub, vib_models()) as (comp, _events):
        loop = comp.loops[0]
        assert await wait_for(lambda: loop.policy.threshold == THRESHOLD, 3.0)
        new = make_ctx(
            [loop_cfg(policy={"threshold": 1e-7, "on_ticks": 2, "off_ticks": 9}, active_value=3.0)]
        )
        comp.reload(new.config)
        assert loop.policy.threshold == 1e-7 and loop.policy.debouncer.on_ticks == 2
        act = actuator_of(comp)
        assert await wait_for(lambda: act.value == 3.0, 3.0)  # every score is above 1e-7
        # back to the manifest's threshold: re-read from the runner on the next tick
        comp.reload(make_ctx([loop_cfg()]).config)
        assert await wait_for(lambda: loop.policy.threshold == THRESHOLD, 3.0)
        assert await wait_for(lambda: act.value == NORMAL, 3.0)


def test_check_config_names_file_line_and_key(tmp_path: Path) -> None:
    from edgerund.config.loader import load_config

    p = tmp_path / "edgerund.yaml"
    p.write_text(
        "gateway: {id: g}\n"
        "sensors:\n"
        "  - {id: imu, driver: mpu6050, bus: 1, address: 0x68, rate_hz: 200}\n"
        "loops:\n"
        "  - id: motor\n"
        "    model: nosuch\n"
        "    inputs:\n"
        "      - {name: accel_g, sensor: imu2, channels: [accel_x], window: 256}\n"
    )
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert f"{p}:6: loops[0].model: unknown model 'nosuch'" in msg
    assert f"{p}:8: loops[0].inputs[0].sensor: unknown sensor 'imu2' (expected one of: imu)" in msg


async def test_slow_actuator_write_times_out_and_is_reported() -> None:
    hub = ScenarioHub.motor(Scenario(seed=1))
    slow = {"driver": "emulated", "name": "relay", "safe_value": SAFE, "write_timeout_ms": 30}
    ctx = make_ctx([loop_cfg(actuator=slow)])
    async with running(ctx, hub, vib_models()) as (comp, _events):
        loop, act = comp.loops[0], actuator_of(comp)
        assert await wait_for(lambda: act.value == NORMAL, 3.0)
        act.cfg = msgspec.structs.replace(act.cfg, write_latency_ms=200.0)  # the device hangs
        loop.written = None  # force a write on the next tick
        assert await wait_for(lambda: loop.actuator_failed == "timeout", 3.0)
        st = comp.status()["loops"][0]
        assert st["actuator"]["state"] == "failed" and st["actuator"]["error"] == "timeout"
        assert st["actuator"]["errors"] >= 1
        act.cfg = msgspec.structs.replace(act.cfg, write_latency_ms=0.0)  # recovers
        assert await wait_for(lambda: loop.actuator_failed is None and act.value == NORMAL, 3.0)


class _TimedRunner(OnnxRunner):
    """OnnxRunner with the timestamp-taking API of ModelRunner: records what it got."""

    def __init__(self, model: bytes, manifest: dict[str, Any]) -> None:
        super().__init__(model, manifest)
        self.times: list[dict[str, Any] | None] = []

    def infer(self, inputs: Any, times: Any = None) -> Any:  # type: ignore[override]
        self.times.append(None if times is None else {k: v.copy() for k, v in times.items()})
        return super().infer(inputs)


async def test_loop_passes_sample_timestamps_to_a_runner_that_takes_them() -> None:
    """The loop hands the runner each windowed input's t_mono (from hub.window), the
    timestamps the model resamples on; a one-argument runner (vib_models) keeps working."""
    scenario = Scenario(seed=1)
    hub = ScenarioHub.motor(scenario)
    runner = _TimedRunner(variance_model(WINDOW), manifest(WINDOW, THRESHOLD))
    ctx = make_ctx([loop_cfg()])
    async with running(ctx, hub, Models(vib=runner)) as (comp, _events):
        loop = comp.loops[0]
        # (the warm-up before the first tick calls the runner too: wait for real ticks)
        assert await wait_for(lambda: loop.ticks >= 3 and len(runner.times) >= 3, 3.0)
        got = runner.times[-1]
        assert got is not None and set(got) == {"vibration"}
        t = got["vibration"]
        assert t.shape == (WINDOW,) and t.dtype == np.float64
        assert (np.diff(t) > 0).all()
        # the timestamps are the ones the hub stored with the samples the loop used
        t_hub, _ = hub.window("imu", "ax", WINDOW + 64)
        assert np.isin(t, t_hub).all()
        assert loop.status()["mode"] == "model"


async def test_held_loops_are_warm_and_tick_only_after_release() -> None:
    """The daemon enters the loops with `hold=True`: the component warms each loop (the
    model is called before any deadline, then the figures are forgotten) and no tick runs
    until `release()` (after the root's gc.collect()/freeze), then ticks follow."""
    scenario = Scenario(seed=1)
    hub = ScenarioHub.motor(scenario)
    runner = _TimedRunner(variance_model(WINDOW), manifest(WINDOW, THRESHOLD))
    ctx = make_ctx([loop_cfg()])
    async with hub, task_scope("loops") as scope:
        assert await wait_for(lambda: len(hub.window("imu", "ax", WINDOW)[1]) >= WINDOW, 5.0)
        comp = build(
            ctx.config,
            samples=hub,
            resources=hub.resources,
            models=Models(vib=runner),
            events=ctx.events,
            scope=scope,
            actuators=ACTUATORS,
            hold=True,
        )
        assert comp is not None
        async with comp:
            loop = comp.loops[0]
            warm_calls = len(runner.times)
            assert warm_calls >= 20  # the warm-up ran the model path before any tick
            await asyncio.sleep(0.3)
            assert loop.ticks == 0 and loop.status()["lateness_ms"]["p99"] is None
            assert len(runner.times) == warm_calls  # held: nothing ran meanwhile
            comp.release()
            assert await wait_for(lambda: loop.ticks >= 5, 3.0)
            assert loop.status()["mode"] == "model"
