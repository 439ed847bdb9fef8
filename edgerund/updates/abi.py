"""The model ABI: one description of a graph tensor, shared by the signed bundle manifest,
the inference runtime's model manifest, the precheck child and the publisher (pure, no I/O).

Theory of operation
-------------------
A model's ABI is the list of its ONNX graph inputs and outputs, each a name, a numpy dtype
name and a shape. Two documents declare it: the signed bundle manifest (`io_signature`,
edgerund.updates.manifest: the trust core, where a dimension may be dynamic: `None` or a
symbolic name) and the model manifest (`model_inputs` / `model_outputs`,
edgerund.inference.manifest: concrete positive dimensions, which its parser enforces).
Both use this one `TensorSpec`, so the two checks of a graph against a manifest (the
precheck child before a trial, `ModelRunner.load` at every load) compare against the same
type. `ORT_DTYPES` maps onnxruntime's type strings to those dtype names.

`opset_for_runtime` is the highest ONNX opset an onnxruntime version runs (the bundle's
`compatibility.opset_max` is checked against it); `runtime_max_opset` asks the installed
onnxruntime for its version (imported lazily: importing this module loads no runtime).
"""

from __future__ import annotations

import msgspec

__all__ = [
    "ORT_DTYPES",
    "IoSignature",
    "TensorSpec",
    "opset_for_runtime",
    "runtime_max_opset",
]

ORT_DTYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}
"""onnxruntime `NodeArg.type` -> numpy dtype name."""


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One tensor of the ONNX graph as a manifest declares it."""

    name: str
    dtype: str  # numpy dtype name: float32, int8, int64, ...
    shape: tuple[int | str | None, ...]  # None / str = a dynamic dimension

    def describe(self) -> str:
        return f"{self.name!r} {self.dtype}{list(self.shape)}"

    def static_shape(self) -> tuple[int, ...]:
        """The shape when every dimension is a concrete int (ValueError otherwise)."""
        dims = tuple(d for d in self.shape if isinstance(d, int) and not isinstance(d, bool))
        if len(dims) != len(self.shape):
            raise ValueError(f"tensor {self.describe()} has a dynamic dimension")
        return dims


class IoSignature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ONNX-level ABI of the model: graph inputs and outputs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


_OPSETS = (((1, 20), 21), ((1, 18), 20), ((1, 17), 20), ((1, 16), 19), ((1, 14), 18))


def opset_for_runtime(version: str) -> int:
    """The highest ONNX opset onnxruntime `version` ("1.19.2") runs; 17 when unknown."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return 17
    if (major, minor) >= (1, 22):
        return 22
    for ver, opset in _OPSETS:
        if (major, minor) >= ver:
            return opset
    return 17


def runtime_max_opset() -> int:
    """The highest ONNX opset the installed onnxruntime runs (from its version)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return 17
    return opset_for_runtime(str(ort.__version__))
