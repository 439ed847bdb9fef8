"""Execution providers (`models[].providers`): the order asked, the CPU as the last resort,
and the provider in use plus the reason for every fallback in `models`, `status` and the
log.

This machine's onnxruntime is the CPU build from PyPI, so asking for TensorRT and CUDA
(what a Jetson's config asks) exercises the real fallback: the providers are not in this
build, the session runs on the CPU, and the reason names what the build has. A provider
that is in the build but fails to initialise (a Jetson without its CUDA libraries)
cannot be produced with a CPU build; that branch is `create_with_fallback`, tested with
a session factory that raises as onnxruntime does.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from edgerund.config.loader import load_config
from edgerund.ctl.render import provider_lines
from edgerund.errors import ConfigError
from edgerund.inference.runner import ModelRunner
from edgerund.inference.session import CPU, create_with_fallback, open_session_with, plan_providers
from tests.helpers.daemon import DaemonProcess
from tests.inference.conftest import REF

JETSON = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]


def test_plan_keeps_the_order_drops_what_the_build_lacks_and_ends_on_the_cpu() -> None:
    plan, dropped = plan_providers(JETSON, ["CUDAExecutionProvider", CPU])
    assert plan == ["CUDAExecutionProvider", CPU]
    assert [p for p, _ in dropped] == ["TensorrtExecutionProvider"]
    assert (
        "not in this onnxruntime build" in dropped[0][1]
        and "CUDAExecutionProvider" in dropped[0][1]
    )
    # The CPU is added when not asked for, and comes last even when asked first.
    assert plan_providers(["CUDAExecutionProvider"], ["CUDAExecutionProvider", CPU])[0] == [
        "CUDAExecutionProvider",
        CPU,
    ]
    assert plan_providers([CPU, "CUDAExecutionProvider"], ["CUDAExecutionProvider", CPU])[0] == [
        "CUDAExecutionProvider",
        CPU,
    ]


def test_a_provider_that_fails_to_initialise_is_dropped_with_the_error() -> None:
    tried: list[list[str]] = []

    def create(ps: list[str]) -> str:
        tried.append(ps)
        if ps[0] == "CUDAExecutionProvider":
            raise RuntimeError("libcudnn.so.9: cannot open shared object file\nmore detail")
        return f"session on {ps[0]}"

    sess, dropped = create_with_fallback(create, ["CUDAExecutionProvider", CPU])
    assert sess == f"session on {CPU}" and tried == [["CUDAExecutionProvider", CPU], [CPU]]
    assert dropped == [
        (
            "CUDAExecutionProvider",
            "failed to initialise: libcudnn.so.9: cannot open shared object file",
        )
    ]

    def broken_model(ps: list[str]) -> str:
        raise RuntimeError("Invalid model")

    with pytest.raises(RuntimeError, match="Invalid model"):  # the CPU's failure is the model's
        create_with_fallback(broken_model, ["CUDAExecutionProvider", CPU])


def test_real_session_falls_back_to_the_cpu_with_the_reason() -> None:
    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # the CPU build
    sess, choice = open_session_with(REF / "model.onnx", JETSON)
    assert sess.get_providers() == [CPU] and choice.active == CPU
    assert [p for p, _ in choice.fallbacks] == JETSON[:2]
    for _, reason in choice.fallbacks:
        assert reason.startswith("not in this onnxruntime build") and CPU in reason
    assert choice.as_dict()["providers_requested"] == JETSON
    # A CPU-only request has nothing to report.
    _, plain = open_session_with(REF / "model.onnx")
    assert plain.active == CPU and plain.fallbacks == ()


def test_runner_reports_the_choice_in_its_stats() -> None:
    r = ModelRunner.load(REF, warmup_runs=2, providers=JETSON)
    s = r.stats()
    assert s["provider"] == CPU and s["providers_requested"] == JETSON
    assert [f["provider"] for f in s["provider_fallbacks"]] == JETSON[:2]
    r.close()


def test_unknown_provider_is_a_config_error_with_the_nearest_name(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "gateway:\n  id: gw\nmodels:\n  - name: m\n"
        f"    path: {REF}\n    providers: [TensorRTExecutionProvider, CPUExecutionProvider]\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    msg = str(exc.value)
    assert "models[0].providers[0]" in msg and "did you mean 'TensorrtExecutionProvider'" in msg
    cfg.write_text(cfg.read_text().replace("TensorRTExecutionProvider", "CUDAExecutionProvider"))
    assert load_config(cfg).models[0].providers == ["CUDAExecutionProvider", CPU]


def test_daemon_reports_provider_and_fallback_reason(tmp_path: Path) -> None:
    models = [{"name": "motor-ae", "path": str(REF), "warmup_runs": 5, "providers": JETSON}]
    with DaemonProcess(tmp_path, {"models": models}) as d:
        d.wait_ready()
        (st,) = d.call("status")["models"]
        (row,) = d.call("models")
    for r in (st, row):
        assert r["provider"] == CPU
        assert [f["provider"] for f in r["provider_fallbacks"]] == JETSON[:2]
        assert all("not in this onnxruntime build" in f["reason"] for f in r["provider_fallbacks"])
    assert row["providers_requested"] == JETSON
    events = [json.loads(ln) for ln in d.log_text.splitlines() if ln.startswith("{")]
    fallbacks = [e for e in events if e.get("event") == "model_provider_fallback"]
    assert [e["provider"] for e in fallbacks] == JETSON[:2], d.log_text
    assert all(
        e["using"] == CPU and "not in this onnxruntime build" in e["reason"] for e in fallbacks
    )
    # What `edgerunctl models` prints under its table (and `status` when a model fell back).
    lines = provider_lines([row])
    assert lines[0] == f"motor-ae: runs on {CPU}"
    assert lines[1].startswith("  not TensorrtExecutionProvider: not in this onnxruntime build")
    assert provider_lines([{**row, "provider_fallbacks": []}], only_fallbacks=True) == []
