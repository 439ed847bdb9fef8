"""Federated statistics: merged across gateways == computed on the union of their data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgerund.inference import federated as fed
from edgerund.inference import outlayer

EDGES = [0.9, 1.6, 1.9, 2.3, 2.9]
ROOT = Path(__file__).resolve().parents[2]


def gateway(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(seed * 0.1, 1.0 + 0.05 * seed, (n, 50))
    s = rng.lognormal(0.0, 0.3, n)
    h = np.maximum(rng.normal(0.0, 1.0, (n, 16)), 0.0)  # hidden activations
    y = h @ rng.normal(0.0, 1.0, (16, 50)) + rng.normal(0.0, 0.1, (n, 50))
    return x, s, h, y


def test_merged_fit_equals_the_fit_on_the_union() -> None:
    parts = [gateway(seed, n) for seed, n in ((1, 700), (2, 1300), (3, 250), (4, 4000), (5, 90))]
    stats = [fed.stats_of(x, s, EDGES, h=h, y=y) for x, s, h, y in parts]
    # through the compact event form and back, as the backend receives them
    stats = [
        fed.decode(json.loads(json.dumps(fed.encode(st, model="m", version="1")))) for st in stats
    ]
    merged = fed.merge(stats)
    ux = np.concatenate([p[0] for p in parts])
    us = np.concatenate([p[1] for p in parts])
    uh = np.concatenate([p[2] for p in parts])
    uy = np.concatenate([p[3] for p in parts])
    union = fed.stats_of(ux, us, EDGES, h=uh, y=uy)
    mu, sd = np.zeros(50), np.ones(50)
    a = fed.fleet_fit(merged, mu_ref=mu, sd_ref=sd, quantile=0.99)
    b = fed.fleet_fit(union, mu_ref=mu, sd_ref=sd, quantile=0.99)
    assert a["count"] == b["count"] == len(ux)
    err = max(
        float(np.abs(a[k] - b[k]).max()) for k in ("mean", "std", "shift_sd", "scale", "ridge")
    )
    assert err < 1e-9, err
    assert a["score_quantile"] == pytest.approx(b["score_quantile"], abs=1e-12)
    # and the union fit is the textbook one
    np.testing.assert_allclose(a["mean"], ux.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(a["std"], ux.std(axis=0), atol=1e-9)
    ha = np.hstack([uh, np.ones((len(uh), 1))])
    reg = 1e-3 * np.eye(17)
    reg[-1, -1] = 0.0
    np.testing.assert_allclose(a["ridge"], np.linalg.solve(ha.T @ ha + reg, ha.T @ uy), atol=1e-9)
    # the device's refit (edgerund.inference.outlayer) pulls towards the signed layer: the
    # same Gram matrices, merged, give the same fit as on the union
    prior = np.random.default_rng(9).normal(0.0, 1.0, (17, 50))
    pa = fed.fleet_fit(merged, mu_ref=mu, sd_ref=sd, lam=50.0, prior=prior)["ridge"]
    pb = fed.fleet_fit(union, mu_ref=mu, sd_ref=sd, lam=50.0, prior=prior)["ridge"]
    assert float(np.abs(pa - pb).max()) < 1e-9
    want = np.linalg.solve(ha.T @ ha + 50.0 * reg / 1e-3, ha.T @ uy + 50.0 * reg / 1e-3 @ prior)
    np.testing.assert_allclose(pa, want, atol=1e-9)
    w, b, _ = outlayer.refit(uh, uy, prior[:-1], prior[-1], ridge=0.1)
    lam = 0.1 * float(np.trace(merged.xtx[:-1, :-1])) / 16
    np.testing.assert_allclose(
        np.vstack([w, b]), fed.ridge(merged.xtx, merged.xty, lam, prior), atol=1e-9
    )


def test_merge_refuses_statistics_of_another_model() -> None:
    x, s, _, _ = gateway(1, 100)
    a = fed.stats_of(x, s, EDGES)
    b = fed.stats_of(x[:, :10], s, EDGES)
    with pytest.raises(ValueError):
        fed.merge([a, b])


def test_fleet_calibration_cli(tmp_path: Path) -> None:
    files = []
    for seed in (1, 2, 3):
        x, s, _, _ = gateway(seed, 500)
        p = tmp_path / f"gw{seed}.json"
        p.write_text(json.dumps(fed.encode(fed.stats_of(x, s, EDGES), model="m", version="1")))
        files.append(str(p))
    out = tmp_path / "fleet.json"
    proc = subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "fleet", "calibration", *files, "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["gateways"] == 3 and doc["count"] == 1500
    assert doc["mean"][0] == pytest.approx(0.2, abs=0.1)
