"""Schema of the `models` section (owned by the inference component).

```yaml
models:
  - name: motor-ae                   # what loops name in `model:`; unique
    path: /usr/share/edgerund/models/motor-ae   # the shipped directory (manifest.json,
                                     # model.onnx, golden.npz); with updates enabled the
                                     # active slot replaces it once one is committed
    latency_budget_ms: 2.0           # measured at warm-up: over budget -> own thread
    check_golden: true               # refuse a model that does not reproduce golden.npz
    drift_monitor: true              # watch features/scores against the manifest's
                                     # reference_profile (docs/learning.md)
    auto_adapt: false                # adapt on the device when drift persists (off:
                                     # only `edgerunctl adapt MODEL` starts one); the
                                     # signed policy's cooldown_s applies either way
    auto_adapt_after_s: 60           # drift reported (plant healthy) this long first
    drift_block: 100                 # inferences per drift-monitor block
    drift_anomaly_blocks: 30         # blocks a sustained anomaly stays "anomaly" before
                                     # a broad feature shift makes it "drift"
    providers: [CPUExecutionProvider]  # onnxruntime execution providers, in order of
                                     # preference; CPU is always the last resort. On a
                                     # Jetson with NVIDIA's onnxruntime-gpu wheel:
                                     # [TensorrtExecutionProvider, CUDAExecutionProvider,
                                     #  CPUExecutionProvider]. The one in use, and why any
                                     # other is not, is in `edgerunctl models` and the log.
```

`cross_check` reads each manifest (a small JSON file) so `edgerund check-config` already
reports a missing directory, a missing manifest field or a model file whose hash differs
from the manifest; loading the ONNX graph and its ABI check happen at start-up.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Protocol

import msgspec

from edgerund.config.base import Section


class ModelConfig(Section):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    path: str
    latency_budget_ms: Annotated[float, msgspec.Meta(gt=0.0, le=1000.0)] = 2.0
    check_golden: bool = True
    warmup_runs: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 50
    drift_monitor: bool = True
    auto_adapt: bool = False
    auto_adapt_after_s: Annotated[float, msgspec.Meta(ge=0.0, le=86400.0)] = 60.0
    drift_block: Annotated[int, msgspec.Meta(ge=10, le=100000)] = 100
    drift_anomaly_blocks: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 30
    providers: Annotated[
        list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9]+ExecutionProvider$")]],
        msgspec.Meta(min_length=1, max_length=8),
    ] = msgspec.field(default_factory=lambda: ["CPUExecutionProvider"])


# onnxruntime's execution providers (its providers.h and the Python API's names); a name
# outside the list is refused by check-config with the nearest one (a typo would
# otherwise only show as "not in this onnxruntime build" at start-up).
KNOWN_PROVIDERS = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "OpenVINOExecutionProvider",
    "DnnlExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "CoreMLExecutionProvider",
    "NnapiExecutionProvider",
    "QNNExecutionProvider",
    "XnnpackExecutionProvider",
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "DmlExecutionProvider",
    "VitisAIExecutionProvider",
    "AzureExecutionProvider",
    "WebGpuExecutionProvider",
)


class _Models(Protocol):
    """What `cross_check` reads of the root config (edgerund/config/schema.py)."""

    @property
    def models(self) -> Sequence[ModelConfig]: ...


def cross_check(cfg: _Models) -> list[tuple[str, str]]:
    """Unique names; each path holds a parseable manifest and the model file it names."""
    from edgerund.inference.errors import ModelError
    from edgerund.inference.manifest import MANIFEST_FILE, load_manifest

    errors: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, mc in enumerate(cfg.models):
        if mc.name in seen:
            errors.append(
                (
                    f"models[{i}].name",
                    f"expected a unique name, got {mc.name!r} (also models[{seen[mc.name]}])",
                )
            )
        seen.setdefault(mc.name, i)
        for j, prov in enumerate(mc.providers):
            if prov not in KNOWN_PROVIDERS:
                near = difflib.get_close_matches(prov, KNOWN_PROVIDERS, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                errors.append(
                    (
                        f"models[{i}].providers[{j}]",
                        f"unknown onnxruntime execution provider {prov!r}{hint}",
                    )
                )
            elif prov in mc.providers[:j]:
                errors.append((f"models[{i}].providers[{j}]", f"{prov!r} is listed twice"))
        d = Path(mc.path)
        if not (d / MANIFEST_FILE).is_file():
            errors.append(
                (
                    f"models[{i}].path",
                    f"expected a directory holding {MANIFEST_FILE} and the "
                    f"model, got {mc.path!r} ({'no ' + MANIFEST_FILE if d.is_dir() else 'not a directory'})",
                )
            )
            continue
        # The config name is the loops' handle; it need not equal the manifest's name.
        try:
            load_manifest(d, check_files=True)
        except ModelError as exc:
            errors.append((f"models[{i}].path", str(exc)))
    return errors
