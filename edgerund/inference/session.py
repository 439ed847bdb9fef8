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

Execution providers (`models[].providers`, e.g. TensorRT then CUDA then CPU on a Jetson)
are tried in the order asked, and the CPU provider is always the last resort, so a model
loads wherever the daemon runs. `open_session_with` reports which provider the session
really uses and, for every provider asked for and not in use, why: not in this
onnxruntime build (the PyPI `onnxruntime` wheel is CPU-only; NVIDIA's `onnxruntime-gpu`
wheel for JetPack has CUDA and TensorRT), or failed to initialise (the error onnxruntime
gave: a missing CUDA/cuDNN/TensorRT library, no GPU). onnxruntime itself would retry on
the CPU, printing the error to stdout; its fallback is turned off and `plan_providers` and
`create_with_fallback` do it explicitly, so that the reason reaches `edgerunctl models`,
`status` and the log. (With its fallback off, an accelerator that fails in the middle of
a run raises: the runner counts a fault and the loop takes its rule-based fallback.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CPU",
    "ProviderChoice",
    "create_with_fallback",
    "open_session",
    "open_session_with",
    "plan_providers",
    "session_options",
]

CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class ProviderChoice:
    """What a model asked for, what its session uses, and why anything else is not."""

    requested: tuple[str, ...]
    active: str
    fallbacks: tuple[tuple[str, str], ...] = ()  # (provider, reason), in the order asked

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.active,
            "providers_requested": list(self.requested),
            "provider_fallbacks": [{"provider": p, "reason": r} for p, r in self.fallbacks],
        }


def plan_providers(
    requested: Sequence[str], available: Sequence[str]
) -> tuple[list[str], list[tuple[str, str]]]:
    """The providers to try, in order (CPU last, always), and the reasons for those
    dropped because this onnxruntime build lacks them."""
    plan: list[str] = []
    dropped: list[tuple[str, str]] = []
    for p in requested:
        if p in plan or p == CPU:
            continue
        if p in available:
            plan.append(p)
        else:
            dropped.append(
                (p, f"not in this onnxruntime build (it has: {', '.join(available) or 'none'})")
            )
    plan.append(CPU)
    return plan, dropped


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def create_with_fallback(
    create: Callable[[list[str]], Any], plan: list[str]
) -> tuple[Any, list[tuple[str, str]]]:
    """`create(providers)` with the whole plan; when it raises, drop the first provider
    (with the error as the reason) and try again, down to the CPU alone, whose failure
    is the model's own and is raised."""
    dropped: list[tuple[str, str]] = []
    plan = list(plan)
    while True:
        try:
            return create(plan), dropped
        except Exception as exc:
            if len(plan) == 1:
                raise
            dropped.append((plan[0], f"failed to initialise: {_first_line(exc)}"))
            plan = plan[1:]


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
    return ort.InferenceSession(source, session_options(), providers=[CPU])


def open_session_with(
    model: bytes | str | Path, providers: Sequence[str] = (CPU,)
) -> tuple[Any, ProviderChoice]:
    """A session over `model` on the first of `providers` that works (CPU last), and the
    report of the choice (see the module docstring)."""
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    plan, dropped = plan_providers(providers, ort.get_available_providers())

    def create(ps: list[str]) -> Any:
        # enable_fallback=0: onnxruntime would otherwise retry on the CPU by itself,
        # printing the error to stdout, where neither the log nor `models` sees it.
        return ort.InferenceSession(source, session_options(), providers=ps, enable_fallback=0)

    sess, failed = create_with_fallback(create, plan)
    dropped += failed
    in_use = list(sess.get_providers())
    for p in plan:
        if p not in in_use and p not in {d for d, _ in dropped}:
            dropped.append((p, "onnxruntime did not enable it"))
    order = {p: i for i, p in enumerate(providers)}
    dropped.sort(key=lambda d: order.get(d[0], len(order)))
    requested = tuple(providers) if CPU in providers else (*providers, CPU)
    return sess, ProviderChoice(requested, in_use[0] if in_use else CPU, tuple(dropped))
