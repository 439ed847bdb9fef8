"""Crafted ONNX models for the update tests (built with the `onnx` helper API).

Each is tiny and deterministic: a healthy affine model, one that yields NaN, one that is
slow (chained matmuls), one that hangs (a Loop with an astronomically large trip count)
and one that yields NaN only on negative live inputs (passes golden vectors, fails
probation).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], n_in: int = 4, n_out: int = 1
) -> bytes:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, n_out])],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def affine(scale: float = 1.0, pad_bytes: int = 0) -> bytes:
    """score = sum(x * w) * scale. `pad_bytes` adds an unused initializer to reach a size."""
    w = numpy_helper.from_array(np.full((4, 1), 0.25 * scale, np.float32), "w")
    inits = [w]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["score"])]
    if pad_bytes:
        pad = numpy_helper.from_array(
            np.random.default_rng(1).standard_normal(pad_bytes // 4).astype(np.float32), "pad"
        )
        inits.append(pad)
    return _model(nodes, inits)


def nan_always() -> bytes:
    """score = sqrt(-(|x|) - 1): NaN for every input."""
    one = numpy_helper.from_array(np.ones((1, 1), np.float32), "one")
    w = numpy_helper.from_array(np.full((4, 1), 0.25, np.float32), "w")
    nodes = [
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["s"]),
        helper.make_node("Neg", ["s"], ["n"]),
        helper.make_node("Sub", ["n", "one"], ["m"]),
        helper.make_node("Sqrt", ["m"], ["score"]),
    ]
    return _model(nodes, [one, w])


def nan_on_negative() -> bytes:
    """score = sqrt(mean(x)): finite on positive inputs, NaN on negative ones."""
    w = numpy_helper.from_array(np.full((4, 1), 0.25, np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["s"]),
        helper.make_node("Sqrt", ["s"], ["score"]),
    ]
    return _model(nodes, [w])


def slow(n: int = 12, dim: int = 384, rows: int = 1) -> bytes:
    """A chain of n (rows x dim) @ (dim x dim) matmuls: milliseconds per inference."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, dim)) * 0.01).astype(np.float32), "w0"),
        numpy_helper.from_array(np.array([rows, 1], np.int64), "reps"),
        numpy_helper.from_array(np.ones((dim, 1), np.float32), "wout"),
    ]
    nodes = [
        helper.make_node("Tile", ["x", "reps"], ["xt"]),
        helper.make_node("MatMul", ["xt", "w0"], ["h0"]),
    ]
    for i in range(1, n + 1):
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((dim, dim)) * 0.01).astype(np.float32), f"w{i}"
            )
        )
        nodes.append(helper.make_node("MatMul", [f"h{i - 1}", f"w{i}"], [f"h{i}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{n}"], ["hm"], axes=[0], keepdims=1))
    nodes.append(helper.make_node("MatMul", ["hm", "wout"], ["score"]))
    return _model(nodes, inits)


def hang() -> bytes:
    """A Loop whose trip count is 2^62: onnxruntime spins 'forever'."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one_b"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, 1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 1]),
        ],
        initializer=[numpy_helper.from_array(np.ones((1, 1), np.float32), "one_b")],
    )
    inits = [
        numpy_helper.from_array(np.array(2**62, np.int64), "trip"),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(np.full((4, 1), 0.25, np.float32), "w"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["s"]),
        helper.make_node("Loop", ["trip", "cond", "s"], ["score"], body=body),
    ]
    return _model(nodes, inits)
