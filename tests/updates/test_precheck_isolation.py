"""The precheck child runs isolated (`python -I`): a module planted in the daemon's working
directory that shadows one of the child's imports is never executed (#12 item 11), and the
child still finds the edgerund package it was given explicitly."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from edgerund.publisher import build as B
from edgerund.updates.abi import IoSignature
from edgerund.updates.manifest import Health
from edgerund.updates.precheck import run_precheck
from tests.updates import models as M

PLANTED = """
import pathlib
pathlib.Path({marker!r}).write_text("executed")
raise SystemExit(99)
"""


def _slot(d: Path) -> IoSignature:
    d.mkdir()
    model = M.affine(2.0)
    (d / "model.onnx").write_bytes(model)
    (d / "golden-io.npz").write_bytes(B.make_golden(model, n=2))
    return msgspec.convert(B.io_signature_of(model), IoSignature)


async def test_module_planted_in_cwd_is_not_executed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sig = _slot(tmp_path / "slot")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "pwned"
    # numpy and onnxruntime are imported by the child's checks; msgspec and json by the
    # module itself: each would run from the working directory without isolation.
    for mod in ("numpy", "onnxruntime", "msgspec", "json"):
        (cwd / f"{mod}.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.chdir(cwd)
    # PYTHONPATH pointing at the planted directory is ignored too.
    monkeypatch.setenv("PYTHONPATH", f"{cwd}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = await run_precheck(
        tmp_path / "slot",
        None,
        sig,
        Health(latency_p95_ms=500.0),
        timeout_s=60.0,
        cpu_s=60.0,
        runs=5,
    )
    assert not marker.exists(), "a module from the working directory ran in the precheck child"
    assert res.ok, (res.reason, res.message)  # the child found the package and checked the model
    assert res.figures is not None and res.figures["golden_samples"] == 2
