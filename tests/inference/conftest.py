"""Helpers for the inference tests: copies of the shipped reference model and tiny ONNX
graphs built with onnx.helper (a NaN-producing model, a model with another input width)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REF = Path(__file__).resolve().parents[2] / "models" / "reference"


def copy_reference(dst: Path, *, with_fp32: bool = False) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "model.onnx", "golden.npz"):
        shutil.copy2(REF / name, dst / name)
    if with_fp32:
        shutil.copy2(REF / "model_fp32.onnx", dst / "model_fp32.onnx")
    return dst


def edit_manifest(model_dir: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    p = model_dir / "manifest.json"
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc, indent=2))


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tiny_onnx(path: Path, n_features: int, *, mode: str = "sumsq") -> None:
    """A one-output model: score = sum(x^2) ("sumsq") or log(-1 - sum(x^2)) ("nan")."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceSumSquare", ["features"], ["s"], axes=[1], keepdims=0)]
    inits = []
    if mode == "sumsq":
        nodes.append(helper.make_node("Identity", ["s"], ["score"]))
    elif mode == "nan":
        inits.append(numpy_helper.from_array(np.array([-1.0], np.float32), "minus_one"))
        nodes += [
            helper.make_node("Neg", ["s"], ["neg"]),
            helper.make_node("Add", ["neg", "minus_one"], ["arg"]),
            helper.make_node("Log", ["arg"], ["score"]),
        ]
    else:
        raise ValueError(mode)
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, n_features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))


def install_model(model_dir: Path, onnx_path: Path, *, drop_golden: bool = True) -> None:
    """Make `onnx_path` the directory's model.onnx and fix the manifest hash."""
    shutil.copy2(onnx_path, model_dir / "model.onnx")

    def fix(doc: dict[str, Any]) -> None:
        doc["model"]["sha256"] = sha256(model_dir / "model.onnx")
        if drop_golden:
            doc.pop("golden", None)

    edit_manifest(model_dir, fix)


@pytest.fixture
def ref_copy(tmp_path: Path) -> Path:
    return copy_reference(tmp_path / "model")
