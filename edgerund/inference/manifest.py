"""The model manifest (`manifest.json`): the model ABI and everything needed to run it.

Theory of operation
-------------------
A model directory holds `manifest.json`, the ONNX file it names and, optionally, golden
vectors. The manifest is the contract between three parties: the build (models/build.py)
writes it, the control loops read `inputs` to know which raw arrays to supply, and the
`ModelRunner` reads `preprocessing`, `model_inputs`/`model_outputs` and `threshold`.

Format `edgerund.model/1` (JSON object; * = required):

- `format`*: "edgerund.model/1"; `name`*, `version`* (strings), `description`.
- `model`*: {`file`*: "model.onnx", `sha256`: hex of the file, `precision`: "int8"|"fp32",
  `quantization`, `opset`}.
- `reference_fp32`: {`file`, `sha256`, `threshold`}: the unquantised model, for comparison.
- `inputs`*: the RAW inputs a control loop supplies, in order, each {`name`*, `shape`*
  (list of positive ints), `dtype`* ("float32"), `rate_hz`, `unit`, `description`}.
- `preprocessing`*: {`kind`*: "fft_band_energy/1" | "fft_band_energy/2", ...}
  (edgerund.inference.features); kind /2 adds `resample`: {`method`*: "linear",
  `max_gap_ms`*, `min_density`}: the vibration input is resampled on per-sample
  timestamps that the loop passes as `runner.infer(inputs, times={name: t})`.
- `model_inputs`*, `model_outputs`*: the ONNX graph's tensors [{`name`, `shape`,
  `dtype`}]; the runner checks the loaded graph against them (the ABI check).
- `output`*: {`name`*: the output holding the score, `meaning`, `higher_is_anomalous`}.
- `threshold`*: the anomaly threshold on the score (a number).
- `golden`: {`file`: "golden.npz", `sha256`, `rtol`, `atol`, `feature_atol`}; an array
  `<input>_t` in the file holds that input's timestamps (passed as `times`).
- `reference_profile`, `adaptation`, `must_detect`, `output_layer` (optional;
  edgerund.inference.profile): the drift monitor's baseline, the bounds of an on-device
  calibration, the fault signatures a calibration must keep detecting and the output
  layer a calibration may refit.
- Free-form: `threshold_rule`, `training`, `quality`, `sizes_bytes`.

Parsing is pure (bytes -> ModelManifest); every error names the field (`inputs[1].shape`)
and says what was expected and what was found.

Names: this is the *model* manifest, read from a model directory by the runtime on every
load. The signed *bundle* manifest (edgerund.updates.manifest.BundleManifest: bundle id,
security counter, expiry, file hashes, health criteria) is another document, the trust
decision's input; it carries this one verbatim as `model_manifest`. Both describe the
graph's tensors with the one `TensorSpec` of edgerund.updates.abi (here every dimension is
a concrete positive int: the parser refuses dynamic ones).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerund.inference.errors import ModelError
from edgerund.inference.features import FeatureError, FeatureSpec
from edgerund.inference.profile import (
    AdaptationPolicy,
    MustDetectSpec,
    OutputLayerSpec,
    ReferenceProfile,
    parse_adaptation,
    parse_must_detect,
    parse_output_layer,
    parse_profile,
)
from edgerund.updates.abi import TensorSpec

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "InputSpec",
    "ModelManifest",
    "TensorSpec",
    "load_manifest",
    "parse_manifest",
]

FORMAT = "edgerund.model/1"
MANIFEST_FILE = "manifest.json"
DTYPES = ("float32", "float64", "int8", "uint8", "int16", "int32", "int64")


@dataclass(frozen=True)
class InputSpec:
    """One raw input the control loop supplies (before preprocessing)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    rate_hz: float | None = None
    unit: str | None = None
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "rate_hz": self.rate_hz,
            "unit": self.unit,
        }


@dataclass(frozen=True)
class GoldenSpec:
    file: str
    sha256: str | None = None
    rtol: float = 0.02
    atol: float = 0.02
    feature_atol: float = 1e-4


@dataclass(frozen=True)
class ModelManifest:
    """A model directory's manifest.json (format edgerund.model/1), parsed."""

    name: str
    version: str
    model_file: str
    model_sha256: str | None
    precision: str
    inputs: tuple[InputSpec, ...]
    preprocessing: FeatureSpec
    model_inputs: tuple[TensorSpec, ...]
    model_outputs: tuple[TensorSpec, ...]
    output_name: str
    higher_is_anomalous: bool
    threshold: float
    golden: GoldenSpec | None
    fp32_file: str | None = None
    fp32_sha256: str | None = None
    fp32_threshold: float | None = None
    sha256: bytes = b""  # SHA-256 of the manifest.json bytes (bound into the TPM PCR)
    raw: Mapping[str, Any] = field(default_factory=dict)
    profile: ReferenceProfile | None = None
    adaptation: AdaptationPolicy | None = None
    must_detect: MustDetectSpec | None = None
    output_layer: OutputLayerSpec | None = None

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)


class _Reader:
    """Typed field access with errors naming the field path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, msg: str) -> ModelError:
        return ModelError(f"{self.where}: {path}: {msg}", code="manifest")

    def get(self, obj: Mapping[str, Any], key: str, path: str, required: bool = True) -> Any:
        if key not in obj or obj[key] is None:
            if required:
                raise self.fail(path, "missing")
            return None
        return obj[key]

    def str_(
        self, obj: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> str | None:
        v = self.get(obj, key, path, required)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise self.fail(path, f"expected a non-empty string, got {v!r}")
        return v

    def obj(
        self, obj: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> Mapping[str, Any] | None:
        v = self.get(obj, key, path, required)
        if v is None:
            return None
        if not isinstance(v, Mapping):
            raise self.fail(path, f"expected an object, got {type(v).__name__}")
        return v

    def list_(self, obj: Mapping[str, Any], key: str, path: str) -> Sequence[Any]:
        v = self.get(obj, key, path)
        if not isinstance(v, list) or not v:
            raise self.fail(path, f"expected a non-empty list, got {v!r}")
        return v

    def number(
        self, obj: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> float | None:
        v = self.get(obj, key, path, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(path, f"expected a finite number, got {v!r}")
        return float(v)

    def shape(self, obj: Mapping[str, Any], path: str) -> tuple[int, ...]:
        v = self.get(obj, "shape", f"{path}.shape")
        if (
            not isinstance(v, list)
            or not v
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)
        ):
            raise self.fail(f"{path}.shape", f"expected a list of positive integers, got {v!r}")
        return tuple(v)

    def dtype(self, obj: Mapping[str, Any], path: str) -> str:
        v = self.str_(obj, "dtype", f"{path}.dtype")
        if v not in DTYPES:
            raise self.fail(f"{path}.dtype", f"expected one of {list(DTYPES)}, got {v!r}")
        return v

    def tensors(self, obj: Mapping[str, Any], key: str) -> tuple[TensorSpec, ...]:
        out = []
        for i, t in enumerate(self.list_(obj, key, key)):
            p = f"{key}[{i}]"
            if not isinstance(t, Mapping):
                raise self.fail(p, f"expected an object, got {t!r}")
            name = self.str_(t, "name", f"{p}.name")
            assert name is not None
            out.append(TensorSpec(name=name, shape=self.shape(t, p), dtype=self.dtype(t, p)))
        return tuple(out)


def parse_manifest(data: bytes, where: str = MANIFEST_FILE) -> ModelManifest:
    """Parse and validate manifest bytes. Raises ModelError naming the field."""
    r = _Reader(where)
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where}: not valid JSON ({exc})", code="manifest") from None
    if not isinstance(doc, dict):
        raise ModelError(
            f"{where}: expected a JSON object, got {type(doc).__name__}", code="manifest"
        )
    fmt = r.str_(doc, "format", "format")
    if fmt != FORMAT:
        raise r.fail("format", f"expected {FORMAT!r}, got {fmt!r}")
    name = r.str_(doc, "name", "name")
    version = r.str_(doc, "version", "version")
    model = r.obj(doc, "model", "model")
    assert name is not None and version is not None and model is not None
    model_file = r.str_(model, "file", "model.file")
    assert model_file is not None
    _plain_file(r, model_file, "model.file")
    model_sha = r.str_(model, "sha256", "model.sha256", required=False)
    precision = r.str_(model, "precision", "model.precision", required=False) or "unknown"

    inputs: list[InputSpec] = []
    for i, item in enumerate(r.list_(doc, "inputs", "inputs")):
        p = f"inputs[{i}]"
        if not isinstance(item, Mapping):
            raise r.fail(p, f"expected an object, got {item!r}")
        iname = r.str_(item, "name", f"{p}.name")
        assert iname is not None
        if any(x.name == iname for x in inputs):
            raise r.fail(f"{p}.name", f"expected unique input names, got {iname!r} twice")
        inputs.append(
            InputSpec(
                name=iname,
                shape=r.shape(item, p),
                dtype=r.dtype(item, p),
                rate_hz=r.number(item, "rate_hz", f"{p}.rate_hz", required=False),
                unit=r.str_(item, "unit", f"{p}.unit", required=False),
                description=str(item.get("description") or ""),
            )
        )

    pre = r.obj(doc, "preprocessing", "preprocessing")
    assert pre is not None
    try:
        spec = FeatureSpec.from_json(pre)
    except FeatureError as exc:
        raise ModelError(f"{where}: {exc}", code="manifest") from None
    declared = {i.name: i for i in inputs}
    vib = declared.get(spec.vibration_input)
    if vib is None:
        raise r.fail(
            "preprocessing.vibration_input",
            f"expected one of the declared inputs {sorted(declared)}, got {spec.vibration_input!r}",
        )
    if vib.shape != (spec.window, spec.axes):
        raise r.fail(
            f"inputs[{inputs.index(vib)}].shape",
            f"expected [{spec.window}, {spec.axes}] (preprocessing window x axes), got {list(vib.shape)}",
        )
    for s in spec.scalars:
        if s not in declared:
            raise r.fail(
                "preprocessing.scalars",
                f"expected names of declared inputs {sorted(declared)}, got {s!r}",
            )

    model_inputs = r.tensors(doc, "model_inputs")
    model_outputs = r.tensors(doc, "model_outputs")
    if len(model_inputs) != 1:
        raise r.fail(
            "model_inputs",
            f"expected exactly one tensor (the feature vector), got {len(model_inputs)}",
        )
    mi = model_inputs[0]
    if mi.dtype != "float32" or mi.shape != (1, spec.n_features):
        raise r.fail(
            "model_inputs[0]",
            f"expected float32[1, {spec.n_features}] (the preprocessing output), got {mi.dtype}{list(mi.shape)}",
        )
    output = r.obj(doc, "output", "output")
    assert output is not None
    out_name = r.str_(output, "name", "output.name")
    assert out_name is not None
    out_spec = next((t for t in model_outputs if t.name == out_name), None)
    if out_spec is None:
        raise r.fail(
            "output.name",
            f"expected one of model_outputs {[t.name for t in model_outputs]}, got {out_name!r}",
        )
    if out_spec.dtype != "float32" or math.prod(out_spec.static_shape()) != 1:
        raise r.fail(
            "output.name", f"expected a float32 tensor of one element, got {out_spec.describe()}"
        )
    higher = output.get("higher_is_anomalous", True)
    if not isinstance(higher, bool):
        raise r.fail("output.higher_is_anomalous", f"expected true or false, got {higher!r}")
    threshold = r.number(doc, "threshold", "threshold")
    assert threshold is not None

    golden = None
    g = r.obj(doc, "golden", "golden", required=False)
    if g is not None:
        gfile = r.str_(g, "file", "golden.file")
        assert gfile is not None
        _plain_file(r, gfile, "golden.file")
        golden = GoldenSpec(
            file=gfile,
            sha256=r.str_(g, "sha256", "golden.sha256", required=False),
            rtol=r.number(g, "rtol", "golden.rtol", required=False) or 0.02,
            atol=r.number(g, "atol", "golden.atol", required=False) or 0.02,
            feature_atol=r.number(g, "feature_atol", "golden.feature_atol", required=False) or 1e-4,
        )
    fp32 = r.obj(doc, "reference_fp32", "reference_fp32", required=False)
    fp32_file = fp32_sha = None
    fp32_thr = None
    if fp32 is not None:
        fp32_file = r.str_(fp32, "file", "reference_fp32.file")
        assert fp32_file is not None
        _plain_file(r, fp32_file, "reference_fp32.file")
        fp32_sha = r.str_(fp32, "sha256", "reference_fp32.sha256", required=False)
        fp32_thr = r.number(fp32, "threshold", "reference_fp32.threshold", required=False)
    profile = parse_profile(doc.get("reference_profile"), spec.n_features, where)
    adaptation = parse_adaptation(doc.get("adaptation"), where)
    must_detect = parse_must_detect(doc.get("must_detect"), where)
    output_layer = parse_output_layer(doc.get("output_layer"), where)
    if output_layer is not None:
        _plain_file(r, output_layer.file, "output_layer.file")
    if must_detect is not None:
        _plain_file(r, must_detect.file, "must_detect.file")

    return ModelManifest(
        name=name,
        version=version,
        model_file=model_file,
        model_sha256=model_sha,
        precision=precision,
        inputs=tuple(inputs),
        preprocessing=spec,
        model_inputs=model_inputs,
        model_outputs=model_outputs,
        output_name=out_name,
        higher_is_anomalous=higher,
        threshold=threshold,
        golden=golden,
        fp32_file=fp32_file,
        fp32_sha256=fp32_sha,
        fp32_threshold=fp32_thr,
        sha256=hashlib.sha256(data).digest(),
        raw=doc,
        profile=profile,
        adaptation=adaptation,
        must_detect=must_detect,
        output_layer=output_layer,
    )


def _plain_file(r: _Reader, name: str, path: str) -> None:
    """File names in a manifest stay inside the model directory."""
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise r.fail(path, f"expected a plain file name inside the model directory, got {name!r}")


def load_manifest(model_dir: Path, *, check_files: bool = False) -> ModelManifest:
    """Read `model_dir/manifest.json` (blocking: call off the event loop for big dirs).

    With `check_files`, also require the model file (and golden file) to exist and, when
    the manifest gives a sha256, to match it."""
    path = Path(model_dir) / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(
            f"{path}: not found (a model directory holds {MANIFEST_FILE} and the model file)",
            code="manifest",
        ) from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror})", code="manifest") from None
    man = parse_manifest(data, str(path))
    if check_files:
        check_file(Path(model_dir), man.model_file, man.model_sha256, "model.file")
        if man.golden is not None:
            check_file(Path(model_dir), man.golden.file, man.golden.sha256, "golden.file")
    return man


def check_file(model_dir: Path, name: str, sha256: str | None, field_path: str) -> bytes:
    """The file's bytes, after checking it exists and matches the manifest's hash."""
    p = model_dir / name
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ModelError(
            f"{p}: not found (named by {MANIFEST_FILE} {field_path})", code="missing_file"
        ) from None
    except OSError as exc:
        raise ModelError(f"{p}: cannot read ({exc.strerror})", code="missing_file") from None
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256.lower():
            raise ModelError(
                f"{p}: sha256 {got} does not match {MANIFEST_FILE} "
                f"{field_path.replace('.file', '.sha256')} {sha256}",
                code="hash_mismatch",
            )
    return data
