"""models/build.py rebuilds the shipped reference model bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inference.conftest import REF

ROOT = Path(__file__).resolve().parents[2]
FILES = ("model.onnx", "model_fp32.onnx", "manifest.json", "golden.npz")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rebuild_is_bit_for_bit(tmp_path: Path) -> None:
    """Runs the build in a fresh interpreter (its BLAS pinning must happen before numpy
    loads) into a temporary directory and compares every artifact byte for byte."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS", "OMP_", "MKL_"))}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "models" / "build.py"), "--out", str(tmp_path), "--no-measure"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| bearing_wear |" in proc.stdout  # the quality report is printed
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (REF / name).read_bytes(), (
            f"{name} differs from models/reference/{name}: the committed artifacts are not "
            "what `python models/build.py` produces (rebuild and commit them)"
        )


def test_reference_artifacts_meet_targets() -> None:
    """The quality recorded by the build: AUC >= 0.95, int8 within 0.01 of fp32, ~4x smaller."""
    import json

    man = json.loads((REF / "manifest.json").read_text())
    for kind in ("bearing_wear", "overheat"):
        q = man["quality"][kind]
        assert q["auc_int8"] >= 0.95, (kind, q)
        assert abs(q["auc_int8"] - q["auc_fp32"]) <= 0.01, (kind, q)
    sizes = man["sizes_bytes"]
    assert sizes["model_fp32.onnx"] / sizes["model.onnx"] >= 3.5
    assert (REF / "model.onnx").stat().st_size == sizes["model.onnx"]
    assert man["quality"]["normal"]["false_positive_int8"] <= 0.01
