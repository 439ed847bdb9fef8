"""The model manifest's learning fields: reference profile, adaptation policy, must-detect.

Theory of operation
-------------------
Three optional, publisher-signed fields of `manifest.json` (format edgerund.model/1)
bound what a gateway may learn on its own (docs/learning.md):

- `reference_profile`: what *normal* looked like to the publisher, on held-out normal
  windows: per normalised input feature its `mean`, `std` and `quantiles` (keys are the
  quantile levels as strings, "0.01".."0.99", each a list of one value per feature), and
  the anomaly score's `mean`, `std` and `quantiles`. The drift monitor
  (edgerund.inference.drift) compares live features and scores with it.
- `adaptation`: the policy a device calibration must stay inside: which `parameters` it
  may change ("normalization", "threshold", "output_layer"), `max_shift_sd` (largest
  shift of a feature's mean, in reference standard deviations), `max_scale_ratio`
  (largest change of a feature's scale, either way), `max_threshold_ratio` (new
  threshold / signed threshold, either way), `min_samples`, `cooldown_s`,
  `target_false_alarm` (the score quantile the threshold is fit at is 1 - this),
  `threshold_margin` (x that quantile, as the build does) and `max_tail_ratio` (a fitting
  window whose score p99 exceeds this x the profile's is excluded: a heavy tail); for the
  output-layer refit, `max_output_change` (largest ||W' - W||_F / ||W||_F of the output
  layer, bias row included) and `output_ridge` (the ridge strength pulling W' towards the
  signed W, relative to the mean diagonal of the hidden activations' Gram matrix).
- `output_layer`: {`hidden_tensor`: the graph tensor the output layer reads (the last
  hidden layer's activations), `hidden_size`, `file` (golden.npz), `weights`, `bias`: the
  arrays holding that layer dequantised, float32}: what a refit starts from.
- `must_detect`: {`file`: the npz holding them (golden.npz), `features`: the array of
  raw (un-normalised) feature vectors of synthesised faults, `case`: their case index,
  `cases`: [{kind, severity, vectors}]}. A calibration under which any of them no longer
  scores above the threshold is refused.

All are optional: a manifest without them (model 1.x, 2.0.0 before this change)
loads as before; the drift monitor and the fitter then say they have no baseline.
Parsing is pure and every error names the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgerund.inference.errors import ModelError

__all__ = [
    "PARAMETERS",
    "AdaptationPolicy",
    "MustDetectSpec",
    "OutputLayerSpec",
    "ReferenceProfile",
    "parse_adaptation",
    "parse_must_detect",
    "parse_output_layer",
    "parse_profile",
]

PARAMETERS = ("normalization", "threshold", "output_layer")


@dataclass(frozen=True)
class ReferenceProfile:
    samples: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    quantiles: Mapping[float, tuple[float, ...]]
    score_mean: float
    score_std: float
    score_quantiles: Mapping[float, float]

    @property
    def n_features(self) -> int:
        return len(self.mean)


@dataclass(frozen=True)
class AdaptationPolicy:
    parameters: tuple[str, ...] = ("normalization", "threshold")
    max_shift_sd: float = 4.0
    max_scale_ratio: float = 2.0
    max_threshold_ratio: float = 1.5
    min_samples: int = 600
    cooldown_s: float = 3600.0
    target_false_alarm: float = 0.001
    threshold_margin: float = 1.5
    max_tail_ratio: float = 3.0
    max_output_change: float = 1.0
    output_ridge: float = 0.1

    def to_json(self) -> dict[str, Any]:
        return {
            "parameters": list(self.parameters),
            "max_shift_sd": self.max_shift_sd,
            "max_scale_ratio": self.max_scale_ratio,
            "max_threshold_ratio": self.max_threshold_ratio,
            "min_samples": self.min_samples,
            "cooldown_s": self.cooldown_s,
            "target_false_alarm": self.target_false_alarm,
            "threshold_margin": self.threshold_margin,
            "max_tail_ratio": self.max_tail_ratio,
            "max_output_change": self.max_output_change,
            "output_ridge": self.output_ridge,
        }


@dataclass(frozen=True)
class OutputLayerSpec:
    hidden_tensor: str
    hidden_size: int
    file: str
    weights: str
    bias: str


@dataclass(frozen=True)
class MustDetectSpec:
    file: str
    features: str
    case: str
    cases: tuple[Mapping[str, Any], ...]


def _fail(where: str, path: str, msg: str) -> ModelError:
    return ModelError(f"{where}: {path}: {msg}", code="manifest")


def _num(v: Any, where: str, path: str, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(where, path, f"expected a finite number, got {v!r}")
    if positive and v <= 0:
        raise _fail(where, path, f"expected a positive number, got {v!r}")
    return float(v)


def _vec(v: Any, n: int | None, where: str, path: str) -> tuple[float, ...]:
    if not isinstance(v, list) or not v:
        raise _fail(where, path, f"expected a non-empty list of numbers, got {type(v).__name__}")
    if n is not None and len(v) != n:
        raise _fail(where, path, f"expected {n} values (one per feature), got {len(v)}")
    return tuple(_num(x, where, f"{path}[{i}]") for i, x in enumerate(v))


def _level(k: Any, where: str, path: str) -> float:
    try:
        q = float(k)
    except (TypeError, ValueError):
        raise _fail(where, path, f"expected a quantile level like '0.99', got {k!r}") from None
    if not 0.0 < q < 1.0:
        raise _fail(where, path, f"expected a quantile level in (0, 1), got {k!r}")
    return q


def parse_profile(doc: Any, n_features: int, where: str) -> ReferenceProfile | None:
    """`reference_profile` (None when absent). `n_features`: the preprocessing output size."""
    if doc is None:
        return None
    p = "reference_profile"
    if not isinstance(doc, Mapping):
        raise _fail(where, p, f"expected an object, got {type(doc).__name__}")
    feats = doc.get("features")
    score = doc.get("score")
    if not isinstance(feats, Mapping):
        raise _fail(where, f"{p}.features", "expected an object")
    if not isinstance(score, Mapping):
        raise _fail(where, f"{p}.score", "expected an object")
    mean = _vec(feats.get("mean"), n_features, where, f"{p}.features.mean")
    std = _vec(feats.get("std"), n_features, where, f"{p}.features.std")
    if any(s <= 0 for s in std):
        raise _fail(where, f"{p}.features.std", "expected positive standard deviations")
    fq_doc = feats.get("quantiles") or {}
    if not isinstance(fq_doc, Mapping):
        raise _fail(where, f"{p}.features.quantiles", "expected an object")
    fq = {
        _level(k, where, f"{p}.features.quantiles"): _vec(
            v, n_features, where, f"{p}.features.quantiles.{k}"
        )
        for k, v in fq_doc.items()
    }
    sq_doc = score.get("quantiles") or {}
    if not isinstance(sq_doc, Mapping):
        raise _fail(where, f"{p}.score.quantiles", "expected an object")
    sq = {
        _level(k, where, f"{p}.score.quantiles"): _num(v, where, f"{p}.score.quantiles.{k}")
        for k, v in sq_doc.items()
    }
    samples = doc.get("samples", 0)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise _fail(where, f"{p}.samples", f"expected a non-negative integer, got {samples!r}")
    return ReferenceProfile(
        samples=samples,
        mean=mean,
        std=std,
        quantiles=dict(sorted(fq.items())),
        score_mean=_num(score.get("mean"), where, f"{p}.score.mean"),
        score_std=_num(score.get("std"), where, f"{p}.score.std", positive=True),
        score_quantiles=dict(sorted(sq.items())),
    )


def parse_adaptation(doc: Any, where: str) -> AdaptationPolicy | None:
    """`adaptation` (None when absent: the model may not be adapted on the device)."""
    if doc is None:
        return None
    p = "adaptation"
    if not isinstance(doc, Mapping):
        raise _fail(where, p, f"expected an object, got {type(doc).__name__}")
    d = AdaptationPolicy()
    params = doc.get("parameters", list(d.parameters))
    if not isinstance(params, list) or not all(x in PARAMETERS for x in params):
        raise _fail(where, f"{p}.parameters", f"expected a list of {list(PARAMETERS)}")

    def num(key: str, default: float, lo: float, hi: float = math.inf) -> float:
        v = _num(doc.get(key, default), where, f"{p}.{key}")
        if not lo <= v <= hi:
            raise _fail(where, f"{p}.{key}", f"expected a value in [{lo}, {hi}], got {v!r}")
        return v

    min_samples = doc.get("min_samples", d.min_samples)
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 2:
        raise _fail(where, f"{p}.min_samples", f"expected an integer >= 2, got {min_samples!r}")
    return AdaptationPolicy(
        parameters=tuple(params),
        max_shift_sd=num("max_shift_sd", d.max_shift_sd, 0.0),
        max_scale_ratio=num("max_scale_ratio", d.max_scale_ratio, 1.0),
        max_threshold_ratio=num("max_threshold_ratio", d.max_threshold_ratio, 1.0),
        min_samples=min_samples,
        cooldown_s=num("cooldown_s", d.cooldown_s, 0.0),
        target_false_alarm=num("target_false_alarm", d.target_false_alarm, 1e-6, 0.5),
        threshold_margin=num("threshold_margin", d.threshold_margin, 1.0),
        max_tail_ratio=num("max_tail_ratio", d.max_tail_ratio, 1.0),
        max_output_change=num("max_output_change", d.max_output_change, 0.0),
        output_ridge=num("output_ridge", d.output_ridge, 1e-9),
    )


def parse_output_layer(doc: Any, where: str) -> OutputLayerSpec | None:
    """`output_layer` (None when absent: no refit is possible)."""
    if doc is None:
        return None
    p = "output_layer"
    if not isinstance(doc, Mapping):
        raise _fail(where, p, f"expected an object, got {type(doc).__name__}")
    names: list[str] = []
    for key in ("hidden_tensor", "file", "weights", "bias"):
        v = doc.get(key)
        if not isinstance(v, str) or not v or (key == "file" and ("/" in v or v[0] == ".")):
            raise _fail(where, f"{p}.{key}", f"expected a plain name, got {v!r}")
        names.append(v)
    size = doc.get("hidden_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise _fail(where, f"{p}.hidden_size", f"expected a positive integer, got {size!r}")
    return OutputLayerSpec(
        hidden_tensor=names[0], hidden_size=size, file=names[1], weights=names[2], bias=names[3]
    )


def parse_must_detect(doc: Any, where: str) -> MustDetectSpec | None:
    if doc is None:
        return None
    p = "must_detect"
    if not isinstance(doc, Mapping):
        raise _fail(where, p, f"expected an object, got {type(doc).__name__}")
    out: list[str] = []
    for key in ("file", "features", "case"):
        v = doc.get(key)
        if not isinstance(v, str) or not v or "/" in v or v.startswith("."):
            raise _fail(where, f"{p}.{key}", f"expected a plain name, got {v!r}")
        out.append(v)
    cases = doc.get("cases", [])
    if not isinstance(cases, Sequence) or not all(isinstance(c, Mapping) for c in cases):
        raise _fail(where, f"{p}.cases", "expected a list of objects")
    return MustDetectSpec(file=out[0], features=out[1], case=out[2], cases=tuple(cases))
