"""Quantized ONNX inference for the control loops.

- `features`: the preprocessing a manifest declares (shared by models/build.py and runtime)
- `manifest`: the model manifest (model ABI) parser
- `runner`: `ModelRunner` (load + ABI check + warm-up + golden check; `infer()`)
- `registry` / `component`: the "models" component (active runners, atomic swaps)

Importing this package does not import onnxruntime; loading a model does.
"""

from edgerund.inference.errors import ModelError
from edgerund.inference.manifest import ModelManifest, load_manifest, parse_manifest
from edgerund.inference.runner import InferenceResult, ModelRunner

__all__ = [
    "InferenceResult",
    "ModelError",
    "ModelManifest",
    "ModelRunner",
    "load_manifest",
    "parse_manifest",
]
