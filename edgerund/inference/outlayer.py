"""Output-layer refit: the autoencoder's last layer refit in closed form on the device.

Theory of operation
-------------------
The reference model's score is `sum((x - (h W + b))^2)` where x are the (normalised)
features and h the activations of the last hidden layer: the output layer (W, b) is
linear, so with the network below it frozen, the W and b that best reconstruct a site's
normal windows are a least-squares problem with a closed form. With few windows (600)
against 513 parameters per output, it is regularised towards the *signed* layer
(W0, b0), not towards zero:

    [W'; b'] = (A^T A + lambda R)^-1 (A^T Y + lambda R [W0; b0]),   A = [h, 1], Y = x

R = I with a zero for the bias (the bias moves freely: it absorbs a plain offset).
`A^T A` and `A^T Y` are the Gram matrices of edgerund.inference.federated (`gram`), so a
fleet can merge them and get the same fit as on the union of the data; lambda is
`output_ridge x` the mean diagonal of `h^T h` (scale-free: it does not depend on how many
windows were summed). The change is measured as `||[W'; b'] - [W0; b0]||_F /
||[W0; b0]||_F` and bounded by the signed policy's `max_output_change`.

Where h comes from: the model files stay the publisher's bytes. The manifest names the
tensor the output layer reads (`output_layer.hidden_tensor`, in the reference model
`relu4_DequantizeLinear_Output`) and ships (W0, b0) dequantised in golden.npz.
`with_hidden_output` derives, from the verified model bytes, a model that also outputs
that tensor, by appending a serialized ModelProto fragment `graph { node: Identity;
output: hidden }`: protobuf parses concatenated messages as their merge (repeated fields
append), so this is a valid ONNX model with one more node and output, built without the
`onnx` package. That derived session is slower (onnxruntime no longer fuses the last two
layers into QGemm: ~75 us instead of ~25 us a call here) and is used only to fit, and at
run time only by a model whose calibration refit its output layer; the unrefit path runs
the signed model as before. With (W', b') the score is computed in numpy from (x, h),
exactly the formula above; without the reconstruction's int8 rounding of the signed graph
(within the golden tolerance: |diff| <= 0.08 on normal windows, score ~1).

Pure: bytes and arrays in, bytes and arrays out.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgerund.inference import federated

__all__ = ["HIDDEN_OUTPUT", "change", "refit", "scores", "with_hidden_output"]

HIDDEN_OUTPUT = "hidden"
F64 = npt.NDArray[np.float64]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _int_field(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def with_hidden_output(model: bytes, tensor: str, width: int, name: str = HIDDEN_OUTPUT) -> bytes:
    """`model` (serialized ONNX ModelProto) with `tensor` also output as `name`, float32
    [1, width]. Field numbers: ModelProto.graph 7; GraphProto.node 1, .output 12;
    NodeProto.input 1, .output 2, .name 3, .op_type 4; ValueInfoProto.name 1, .type 2;
    TypeProto.tensor_type 1; Tensor.elem_type 1 (FLOAT = 1), .shape 2; dim 1, dim_value 1."""
    node = (
        _len_field(1, tensor.encode())
        + _len_field(2, name.encode())
        + _len_field(3, name.encode())
        + _len_field(4, b"Identity")
    )
    shape = _len_field(1, _int_field(1, 1)) + _len_field(1, _int_field(1, width))
    tensor_type = _int_field(1, 1) + _len_field(2, shape)
    value_info = _len_field(1, name.encode()) + _len_field(2, _len_field(1, tensor_type))
    return model + _len_field(7, _len_field(1, node) + _len_field(12, value_info))


def scores(x: npt.ArrayLike, h: npt.ArrayLike, w: npt.ArrayLike, b: npt.ArrayLike) -> F64:
    """The score under output layer (w, b): sum((x - (h w + b))^2) per row."""
    xa = np.asarray(x, np.float64)
    rec = np.asarray(h, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    out: F64 = ((xa.reshape(rec.shape) - rec) ** 2).sum(axis=1)
    return out


def _aug(w: npt.ArrayLike, b: npt.ArrayLike) -> F64:
    return np.vstack([np.asarray(w, np.float64), np.asarray(b, np.float64).reshape(1, -1)])


def change(w: npt.ArrayLike, b: npt.ArrayLike, w0: npt.ArrayLike, b0: npt.ArrayLike) -> float:
    """||[w; b] - [w0; b0]||_F / ||[w0; b0]||_F."""
    a0 = _aug(w0, b0)
    return float(np.linalg.norm(_aug(w, b) - a0) / max(float(np.linalg.norm(a0)), 1e-300))


def refit(
    h: npt.ArrayLike,
    y: npt.ArrayLike,
    w0: npt.ArrayLike,
    b0: npt.ArrayLike,
    ridge: float,
) -> tuple[F64, F64, float]:
    """(w', b', change): the ridge refit towards (w0, b0) of the module docstring, from the
    Gram matrices of hidden rows `h` (n, H) and targets `y` (n, F)."""
    xtx, xty = federated.gram(h, y)
    lam = ridge * float(np.trace(xtx[:-1, :-1])) / max(len(xtx) - 1, 1)
    a = federated.ridge(xtx, xty, max(lam, 1e-12), prior=_aug(w0, b0))
    w, b = a[:-1], a[-1]
    return w, b, change(w, b, w0, b0)
