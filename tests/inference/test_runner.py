"""ModelRunner: load checks (ABI, not-ONNX, hashes, golden), faults instead of exceptions."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgerund.inference import ModelError, ModelRunner
from edgerund.inference.runner import InferenceResult
from tests.inference.conftest import REF, copy_reference, edit_manifest, install_model, tiny_onnx


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(REF / "golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.load(REF, warmup_runs=10)


def _inputs(g: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {"accel_g": g["accel_g"][i], "temp_c": g["temp_c"][i], "current_a": g["current_a"][i]}


def _times(g: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """The golden window's sample timestamps (the model resamples on them)."""
    return {"accel_g": g["accel_g_t"][i]}


def test_golden_vectors_reproduce_int8_and_fp32(
    runner: ModelRunner, golden: dict[str, Any]
) -> None:
    fp32 = ModelRunner.load(REF, model_file="model_fp32.onnx", warmup_runs=5)
    for i in range(len(golden["label"])):
        r8 = runner.infer(_inputs(golden, i), _times(golden, i))
        assert r8.ok and r8.fault is None
        assert r8.score == pytest.approx(float(golden["score_int8"][i]), rel=0.02, abs=0.02)
        r32 = fp32.infer(_inputs(golden, i), _times(golden, i))
        assert r32.score == pytest.approx(float(golden["score_fp32"][i]), rel=1e-4, abs=1e-4)
        # The labels agree with the thresholds: normal below, anomalous above.
        assert (r8.score > runner.threshold) == bool(golden["label"][i])
        assert (r32.score > fp32.threshold) == bool(golden["label"][i])
    assert fp32.manifest.precision == "int8"  # same manifest, other file
    assert fp32.threshold == fp32.manifest.fp32_threshold != runner.threshold


def test_result_and_stats(runner: ModelRunner, golden: dict[str, Any]) -> None:
    before = runner.stats()["inferences"]
    res = runner.infer(_inputs(golden, 0))
    assert isinstance(res, InferenceResult) and res.infer_us > 0
    s = runner.stats()
    assert s["inferences"] == before + 1
    assert s["infer_us"]["p50"] is not None and s["infer_us"]["max"] >= s["infer_us"]["p50"]
    assert s["score"]["n"] >= 1 and np.isfinite(s["score"]["mean"])
    assert s["mode"] in ("inline", "thread")


def test_bad_inputs_are_counted_faults_not_exceptions(golden: dict[str, Any]) -> None:
    r = ModelRunner.load(REF, warmup_runs=2)
    good = _inputs(golden, 0)
    cases = [
        ({k: v for k, v in good.items() if k != "temp_c"}, "input 'temp_c' missing"),
        ({**good, "accel_g": good["accel_g"][:100]}, "shape (256, 3) expected, got (100, 3)"),
        ({**good, "current_a": np.array([], np.float32)}, "at least one value expected"),
        ({**good, "temp_c": np.array([np.nan], np.float32)}, "non-finite input"),
    ]
    t = golden["accel_g_t"][0]
    back = t.copy()
    back[100] = back[99] - 0.001  # the clock stepped back
    stalled = np.where(np.arange(t.size) >= 200, t + 0.2, t)  # a 200 ms stall
    timed_cases = [
        (back, "strictly increasing expected, sample 100"),
        (stalled, "sensor stalled"),
        (t[:-1], "timestamps: 256 expected"),
    ]
    for feeds, needle in cases:
        res = r.infer(feeds, {"accel_g": t})
        assert not res.ok and res.fault is not None and needle in res.fault
        assert np.isnan(res.score)
    for times, needle in timed_cases:
        res = r.infer(good, {"accel_g": times})
        assert not res.ok and res.fault is not None and needle in res.fault, res.fault
    s = r.stats()
    n_bad = len(cases) + len(timed_cases)
    assert s["faults"] == s["input_faults"] == n_bad and s["nan_outputs"] == 0
    assert s["timed"] is True and s["untimed"] == 0
    assert r.infer(good, {"accel_g": t}).ok  # a good call after bad ones still works
    assert r.infer(good).ok and r.stats()["untimed"] == 1  # without timestamps: counted


def test_nan_output_is_a_counted_fault(tmp_path: Path, golden: dict[str, Any]) -> None:
    d = copy_reference(tmp_path / "nan")
    tiny_onnx(tmp_path / "nan.onnx", 50, mode="nan")
    install_model(d, tmp_path / "nan.onnx")
    r = ModelRunner.load(d, warmup_runs=3)
    res = r.infer(_inputs(golden, 0))
    assert not res.ok and res.fault is not None and "non-finite model output" in res.fault
    assert np.isnan(res.score)
    s = r.stats()
    assert s["nan_outputs"] == 1 and s["faults"] == 1 and s["input_faults"] == 0


def test_golden_mismatch_refuses_the_model(tmp_path: Path) -> None:
    """A graph that computes something else than the build is refused at load."""
    d = copy_reference(tmp_path / "other")
    tiny_onnx(tmp_path / "sumsq.onnx", 50)
    install_model(d, tmp_path / "sumsq.onnx", drop_golden=False)
    with pytest.raises(ModelError, match=r"golden vector 0: score .* vs expected") as ei:
        ModelRunner.load(d)
    assert ei.value.code == "golden_mismatch"
    # With the golden check off (config check_golden: false) the same model loads.
    assert ModelRunner.load(d, check_golden=False).infer is not None


def test_abi_mismatch_names_both_sides(tmp_path: Path) -> None:
    d = copy_reference(tmp_path / "abi")
    tiny_onnx(tmp_path / "w48.onnx", 48)  # the graph takes 48 features, the manifest 50
    install_model(d, tmp_path / "w48.onnx")
    with pytest.raises(ModelError) as ei:
        ModelRunner.load(d)
    msg = str(ei.value)
    assert ei.value.code == "abi_mismatch"
    assert "manifest model_inputs[0] 'features' float32[1, 50]" in msg
    assert "model.onnx input 'features' float32[1, 48]" in msg

    d2 = copy_reference(tmp_path / "abi2")
    edit_manifest(d2, lambda doc: doc["model_inputs"][0].update(name="x"))
    with pytest.raises(
        ModelError, match=r"manifest model_inputs \['x'\] vs model.onnx inputs \['features'\]"
    ):
        ModelRunner.load(d2)


def test_not_onnx_is_refused(tmp_path: Path) -> None:
    d = copy_reference(tmp_path / "junk")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 40)
    install_model(d, junk)
    with pytest.raises(ModelError, match=r"model.onnx: not a loadable ONNX model") as ei:
        ModelRunner.load(d)
    assert ei.value.code == "not_onnx"


def test_model_file_hash_is_checked(tmp_path: Path) -> None:
    d = copy_reference(tmp_path / "tampered")
    data = bytearray((d / "model.onnx").read_bytes())
    data[-1] ^= 1
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(
        ModelError, match=r"sha256 .* does not match manifest.json model.sha256"
    ) as ei:
        ModelRunner.load(d)
    assert ei.value.code == "hash_mismatch"
    with pytest.raises(ModelError, match="not named by the manifest"):
        ModelRunner.load(REF, model_file="other.onnx")


async def test_over_budget_model_runs_on_its_own_thread(golden: dict[str, Any]) -> None:
    r = ModelRunner.load(REF, warmup_runs=3, latency_budget_us=0.001)
    assert r.inline is False and r.stats()["mode"] == "thread"
    seen: list[str] = []
    real = r.infer

    def spy(inputs: Any, times: Any = None) -> InferenceResult:
        seen.append(threading.current_thread().name)
        return real(inputs, times)

    r.infer = spy  # type: ignore[method-assign]
    res = await r.infer_async(_inputs(golden, 9), _times(golden, 9))
    assert res.ok and res.score > r.threshold
    assert seen and seen[0].startswith("model-motor-ae")
    r.close()

    fast = ModelRunner.load(REF, warmup_runs=3, latency_budget_us=1e6)
    assert fast.inline
    res2 = await fast.infer_async(_inputs(golden, 0), _times(golden, 0))
    assert res2.ok and res2.score < fast.threshold
    await asyncio.sleep(0)
