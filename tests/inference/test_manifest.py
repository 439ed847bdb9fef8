"""Manifest parsing: every missing or malformed field is named in the error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgerund.inference import ModelError, load_manifest, parse_manifest
from tests.inference.conftest import REF, edit_manifest

DOC = json.loads((REF / "manifest.json").read_text())


def _without(path: str) -> bytes:
    doc = json.loads(json.dumps(DOC))
    *parents, last = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if isinstance(node, list):
        del node[int(last)]
    else:
        del node[last]
    return json.dumps(doc).encode()


def test_reference_manifest_parses() -> None:
    m = parse_manifest((REF / "manifest.json").read_bytes())
    assert m.name == "motor-ae" and m.precision == "int8"
    assert [(i.name, i.shape, i.dtype) for i in m.inputs] == [
        ("accel_g", (256, 3), "float32"),
        ("temp_c", (1,), "float32"),
        ("current_a", (1,), "float32"),
    ]
    assert m.model_inputs[0].shape == (1, m.preprocessing.n_features)
    assert m.output_name == "score" and m.threshold > 0
    assert len(m.sha256) == 32


@pytest.mark.parametrize(
    "field",
    [
        "format",
        "name",
        "version",
        "model",
        "model.file",
        "inputs",
        "inputs.0.shape",
        "inputs.1.dtype",
        "preprocessing",
        "preprocessing.mean",
        "preprocessing.band_edges_bin",
        "model_inputs",
        "model_outputs",
        "output",
        "output.name",
        "threshold",
        "golden.file",
    ],
)
def test_missing_field_is_named(field: str) -> None:
    with pytest.raises(ModelError) as ei:
        parse_manifest(_without(field), "m.json")
    msg = str(ei.value)
    # inputs.0.shape -> "inputs[0].shape"
    parts = field.split(".")
    expected = parts[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts[1:])
    assert msg.startswith("m.json: "), msg
    assert expected in msg and "missing" in msg, msg


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(format="edgerund.model/9"), "format: expected 'edgerund.model/1'"),
        (lambda d: d.update(threshold="high"), "threshold: expected a finite number"),
        (
            lambda d: d["inputs"][0].update(shape=[256, -3]),
            "inputs[0].shape: expected a list of positive",
        ),
        (lambda d: d["inputs"][0].update(shape=[128, 3]), "inputs[0].shape: expected [256, 3]"),
        (lambda d: d["inputs"][2].update(dtype="complex"), "inputs[2].dtype: expected one of"),
        (
            lambda d: d["model"].update(file="../etc/passwd"),
            "model.file: expected a plain file name",
        ),
        (
            lambda d: d["model_inputs"][0].update(shape=[1, 49]),
            "model_inputs[0]: expected float32[1, 50]",
        ),
        (
            lambda d: d["output"].update(name="recon"),
            "output.name: expected one of model_outputs ['score']",
        ),
        (
            lambda d: d["preprocessing"].update(mean=[0.0] * 3),
            "preprocessing.mean: 50 values expected",
        ),
        (lambda d: d["preprocessing"].update(scalars=["temp_c", "rpm"]), "preprocessing.scalars"),
        (lambda d: d["preprocessing"].update(kind="mfcc/1"), "preprocessing.kind"),
    ],
)
def test_malformed_field_says_expected_and_got(mutate: Any, needle: str) -> None:
    doc = json.loads(json.dumps(DOC))
    mutate(doc)
    with pytest.raises(ModelError) as ei:
        parse_manifest(json.dumps(doc).encode())
    assert needle in str(ei.value)


def test_not_json_and_not_object() -> None:
    with pytest.raises(ModelError, match="not valid JSON"):
        parse_manifest(b"\x89PNG garbage")
    with pytest.raises(ModelError, match="expected a JSON object, got list"):
        parse_manifest(b"[1, 2]")


def test_load_checks_files(ref_copy: Path) -> None:
    load_manifest(ref_copy, check_files=True)
    (ref_copy / "golden.npz").write_bytes(b"changed")
    with pytest.raises(ModelError, match=r"golden.npz: sha256 .* does not match"):
        load_manifest(ref_copy, check_files=True)
    (ref_copy / "model.onnx").unlink()
    with pytest.raises(
        ModelError, match=r"model.onnx: not found \(named by manifest.json model.file\)"
    ):
        load_manifest(ref_copy, check_files=True)
    with pytest.raises(ModelError, match=r"manifest\.json: not found"):
        load_manifest(ref_copy / "nowhere")


def test_edit_helper_roundtrip(ref_copy: Path) -> None:
    edit_manifest(ref_copy, lambda d: d.update(version="9.9.9"))
    assert load_manifest(ref_copy).version == "9.9.9"
