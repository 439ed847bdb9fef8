"""The one place that configures onnxruntime sessions.

The daemon's `ModelRunner`, the model build (`models/build.py`, which computes the golden
vectors with these options) and the control-loop benchmark all open sessions here, so the
options a model is built, measured and run with cannot drift apart.

The options fit tiny models on a small CPU: one intra-op and one inter-op thread,
sequential execution, and no spinning in either pool (`allow_spinning=0`: a spinning
pool burns a core between ticks that the control loops and the drivers need).
ORT_ENABLE_ALL because QDQ int8 models *need* it: only the optimiser fuses
QuantizeLinear/DequantizeLinear pairs into QGemm, without it int8 is slower than fp32.
None of these options changes what a model computes, only how it is scheduled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["open_session", "session_options"]


def session_options() -> Any:
    """onnxruntime session options for tiny models (see the module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's warnings are not ours to print
    return so


def open_session(model: bytes | str | Path) -> Any:
    """A CPU session over `model` (the ONNX bytes or a path) with `session_options()`."""
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])
