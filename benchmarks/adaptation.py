"""Adaptation benchmark: drift kinds x severities, before and after an on-device calibration.

Accelerated time, the daemon's code paths: windows of the simulated plant
(drivers/emulated/scenario.py, with the drift kinds injected) are sampled the way the
gateway samples them (models/build.py `sample_windows`: the emulated MPU-6050 read by the
200 Hz poll with realistic timing, quantised, stamped), turned into features by the
runtime's `Preprocessor`, scored by the shipped int8 model with onnxruntime, fed to the
real `DriftMonitor`, and the calibration is fitted, checked against the signed policy and
the must-detect vectors by the real `edgerund.inference.calibration` functions (with the
output-layer refit when the plain calibration is refused and the signed policy allows it;
`--no-refit` for the first delivery's behaviour). What is *not* exercised here: the slot
gate (installing the calibration).

Per drift kind and severity (plant 42, windows after the drift has fully set in):
- `static_false_alarm_rate`: healthy windows scoring above the signed threshold;
- the monitor's verdict and `drift_detection_delay_s`: blocks of `--block` windows from
  the drift's onset until the state is "drift", x block x the loop period (`--period-ms`;
  the sampled windows are independent, consecutive ticks' windows overlap, so this is an
  optimistic figure for the statistics and exact for the anomaly-persistence rule);
- the calibration (or the refusal and its reason), `fit_ms`;
- after it: `adapted_false_alarm_rate` on fresh healthy windows; detection of bearing
  wear at severity 1 and 0.25 *on the drifted plant*.
Then a slow-onset bearing fault: the monitor calls its sustained trips drift after the
anomaly window; an adaptation is attempted on those blocks; `slow_fault_absorbed` is true
when one was accepted *and* the fault at full severity no longer trips.
Federated: 4 plants' statistics merged vs the union (`federated_max_abs_err`).
Live (`missed_ticks_during_adaptation`): the real daemon (`edgerund run --simulate`, the
shipped simulated config: the `motor` loop at 10 ms, 100 Hz, runs the model), a drift
injected with `sim-inject` (`--live-kind`, default resonance_shift at severity 1: the
heaviest fit, a refused plain calibration then the output-layer refit), then `adapt
--dry-run` through the diagnostics socket `--live-fits` times while the loop runs: the
loop's missed ticks during each fit, against its misses over an equal window just before
(`base_missed_ticks`: the machine's own load). `--no-live` skips it.

Usage: python benchmarks/adaptation.py [--fit-windows 1500] [--test-windows 600]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from drivers.emulated.scenario import DRIFT_KINDS, Anomaly  # noqa: E402
from edgerund.config.loader import simulate_config_path  # noqa: E402
from edgerund.ctl.client import DiagClient, Unreachable  # noqa: E402
from edgerund.errors import CommandError  # noqa: E402
from edgerund.inference import federated  # noqa: E402
from edgerund.inference.adapt import output_layer_input, scorer_for  # noqa: E402
from edgerund.inference.calibration import (  # noqa: E402
    CalibrationRefused,
    FitInput,
    MustDetect,
    apply_normalization,
    calibrate,
    refit_scorer,
)
from edgerund.inference.drift import DriftConfig, DriftMonitor, feature_channels  # noqa: E402
from edgerund.inference.features import FeatureError, Preprocessor  # noqa: E402
from edgerund.inference.manifest import load_manifest  # noqa: E402

REF = ROOT / "models" / "reference"
PLANT = 42
T0 = 4000.0  # past the ambient ramp (30 min) of a drift that starts at 0
SPAN = 6 * 3600.0


def _build_module() -> Any:
    spec = importlib.util.spec_from_file_location("models_build", ROOT / "models" / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["models_build"] = mod
    spec.loader.exec_module(mod)
    return mod


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.b = _build_module()
        self.man = load_manifest(REF, check_files=True)
        self.spec = self.man.preprocessing
        self.scorer = scorer_for(REF / self.man.model_file)
        self.names, self.channels = feature_channels(
            self.spec.n_features,
            self.spec.axes,
            self.spec.n_bands,
            self.spec.vibration_input,
            self.spec.scalars,
        )
        g = np.load(REF / "golden.npz")
        assert self.man.must_detect is not None
        self.md = MustDetect(
            g[self.man.must_detect.features],
            g[self.man.must_detect.case],
            self.man.must_detect.cases,
        )
        self.refit = output_layer_input(self.man, REF) if args.refit else None
        self.draw = 100

    def windows(self, anoms: list[Anomaly], n: int, t_min: float = T0) -> np.ndarray:
        self.draw += 1
        w = self.b.sample_windows(
            PLANT, n, anoms, t_min_s=t_min, t_max_s=t_min + SPAN, draw_seed=self.draw
        )
        return self.features(w)

    def features(self, w: Any) -> np.ndarray:
        """Rows of the runtime's features; a window the gateway could not measure (too
        few samples: an input fault, the loop's fallback) is skipped, as the loop would."""
        pre = Preprocessor(self.spec)
        rows = []
        for i in range(len(w)):
            try:
                rows.append(pre(w.inputs(i), w.times_of(i)).reshape(-1).astype(np.float64))
            except FeatureError:
                continue
        return np.asarray(rows)

    def monitor(self) -> DriftMonitor:
        assert self.man.profile is not None
        return DriftMonitor(
            self.man.profile,
            self.man.threshold,
            names=self.names,
            channels=self.channels,
            vibration_channels=[c for c in self.channels if c.startswith("accel_g.")],
            config=DriftConfig(block=self.args.block, anomaly_max_blocks=self.args.anomaly_blocks),
        )

    def feed(self, mon: DriftMonitor, x: np.ndarray, s: np.ndarray) -> list[tuple[Any, Any, str]]:
        blocks = []
        k = self.args.block
        for i in range(0, len(x) - k + 1, k):
            rep = mon.feed_block(x[i : i + k], s[i : i + k], float(i))
            blocks.append((x[i : i + k], s[i : i + k], rep.state))
        return blocks

    def adapt(self, blocks: list[tuple[Any, Any, str]]) -> tuple[Any, str | None, float]:
        assert self.man.profile is not None and self.man.adaptation is not None
        t0 = time.perf_counter()
        try:
            cal, _ = calibrate(
                FitInput(blocks),
                profile=self.man.profile,
                policy=self.man.adaptation,
                mean0=self.spec.mean,
                std0=self.spec.std,
                threshold0=self.man.threshold,
                scorer=self.scorer,
                names=self.names,
                must_detect=self.md,
                output_layer=self.refit,
            )
        except CalibrationRefused as exc:
            return None, str(exc), (time.perf_counter() - t0) * 1e3
        return cal, None, (time.perf_counter() - t0) * 1e3

    def rate(self, x: np.ndarray, cal: Any) -> float:
        if cal is None:
            return float((self.scorer(x) > self.man.threshold).mean())
        x1 = apply_normalization(x, self.spec.mean, self.spec.std, cal.mean, cal.std)
        score = self.scorer
        if cal.output_layer is not None:
            assert self.refit is not None
            score = refit_scorer(cal.output_layer, self.refit.hidden)
        return float((score(x1) > cal.threshold).mean())

    def delay_s(self, kind: str, sev: float) -> float | None:
        """Blocks from the onset to "drift", on a stream: normal, then the drift."""
        mon = self.monitor()
        k = self.args.block
        pre = self.windows([], 10 * k, t_min=1000.0)
        self.feed(mon, pre, self.scorer(pre))
        post = self.windows([Anomaly(kind, 0.0, 1e9, severity=sev)], 80 * k)  # type: ignore[arg-type]
        s = self.scorer(post)
        for j, i in enumerate(range(0, len(post), k)):
            if mon.feed_block(post[i : i + k], s[i : i + k], float(j)).state == "drift":
                return (j + 1) * k * self.args.period_ms / 1000.0
        return None

    def case(self, kind: str, sev: float) -> dict[str, Any]:
        a = self.args
        drift = [Anomaly(kind, 0.0, 1e9, severity=sev)]  # type: ignore[arg-type]
        x_fit = self.windows(drift, a.fit_windows)
        s_fit = self.scorer(x_fit)
        mon = self.monitor()
        blocks = self.feed(mon, x_fit, s_fit)
        x_test = self.windows(drift, a.test_windows)
        bearing = self.windows([*drift, Anomaly("bearing_wear", 0.0, 1e9)], a.test_windows // 2)
        quarter = self.windows(
            [*drift, Anomaly("bearing_wear", 0.0, 1e9, severity=0.25)], a.test_windows // 2
        )
        cal, refused, fit_ms = self.adapt(blocks)
        # adaptation runs only when the monitor says drift; otherwise the static model stays
        used = cal if mon.report().state == "drift" else None
        return {
            "kind": kind,
            "severity": sev,
            "monitor_state": mon.report().state,
            "moved": mon.report().n_moved,
            "static_false_alarm_rate": round(self.rate(x_test, None), 4),
            "static_detection_rate": round(self.rate(bearing, None), 4),
            "refused": refused,
            "adapted": used is not None,
            "fit_ms": round(fit_ms, 1),
            "adapted_false_alarm_rate": round(self.rate(x_test, used), 4),
            "adapted_detection_rate": round(self.rate(bearing, used), 4),
            "quarter_severity_detection_rate": round(self.rate(quarter, used), 4),
            "threshold": None if used is None else round(used.threshold, 4),
            "output_layer_change": None
            if used is None or used.output_layer is None
            else round(used.output_layer.change, 3),
        }

    def slow_fault(self) -> dict[str, Any]:
        """A slow-onset bearing fault: windows over its ramp (30 min) and after."""
        a = self.args
        slow = [Anomaly("slow_bearing", 0.0, 1e9, severity=1.0)]
        self.draw += 1
        w = self.b.sample_windows(
            PLANT, a.fit_windows, slow, t_min_s=0.0, t_max_s=3600.0, draw_seed=self.draw
        )
        x = self.features(w)
        s = self.scorer(x)
        mon = self.monitor()
        blocks = self.feed(mon, x, s)
        cal, refused, _ = self.adapt(blocks) if mon.report().state == "drift" else (None, None, 0)
        full = self.windows(slow, a.test_windows // 2)
        det = self.rate(full, cal)
        return {
            "monitor_state": mon.report().state,
            "refused": refused,
            "adapted": cal is not None,
            "detection_after": round(det, 4),
            "absorbed": bool(cal is not None and det < 0.5),
        }

    def federated(self) -> float:
        parts = []
        for seed in (42, 301, 302, 303):
            self.draw += 1
            w = self.b.sample_windows(
                seed, 300, [Anomaly("gain_drift", 0.0, 1e9)], T0, T0 + SPAN, draw_seed=self.draw
            )
            x = self.features(w)
            parts.append((x, self.scorer(x)))
        assert self.man.profile is not None
        edges = [
            self.man.profile.score_quantiles[q] for q in sorted(self.man.profile.score_quantiles)
        ]
        merged = federated.merge(federated.stats_of(x, s, edges) for x, s in parts)
        union = federated.stats_of(
            np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), edges
        )
        mu, sd = self.man.profile.mean, self.man.profile.std
        fa = federated.fleet_fit(merged, mu_ref=mu, sd_ref=sd)
        fb = federated.fleet_fit(union, mu_ref=mu, sd_ref=sd)
        return max(float(np.abs(fa[k] - fb[k]).max()) for k in ("mean", "std", "shift_sd", "scale"))


def _wait(pred: Any, timeout_s: float, what: str, log: Path) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            v = pred()
        except (Unreachable, OSError):
            v = None
        if v:
            return v
        time.sleep(0.5)
    raise SystemExit(f"live daemon: {what} not within {timeout_s} s\n{log.read_text()[-3000:]}")


def live_missed_ticks(args: argparse.Namespace) -> dict[str, Any]:
    """Ticks of the 100 Hz `motor` loop missed while `adapt --dry-run` fits (docstring)."""
    with tempfile.TemporaryDirectory(prefix="edgerund-adapt-") as tmp:
        t = Path(tmp)
        cfg = yaml.safe_load(simulate_config_path().read_text())
        cfg.setdefault("paths", {})["state_dir"] = str(t / "state")
        cfg["paths"]["run_dir"] = str(t / "run")
        cfg.setdefault("diag", {})["socket"] = str(t / "diag.sock")
        cfg.setdefault("logging", {})["format"] = "json"
        model = cfg["models"][0]
        model.update(drift_block=args.block, drift_anomaly_blocks=args.anomaly_blocks)
        (t / "edgerund.yaml").write_text(yaml.safe_dump(cfg))
        log = t / "daemon.log"
        cmd = [sys.executable, "-m", "edgerund.cli", "run", "-c", str(t / "edgerund.yaml")]
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [*cmd, "--simulate"], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT
            )
        try:
            c = DiagClient(str(t / "diag.sock"), timeout_s=120.0)

            def drift() -> dict[str, Any]:
                row = next(m for m in c.call("models") if m["name"] == model["name"])
                d: dict[str, Any] = row.get("drift") or {}
                return d

            def loop() -> tuple[int, int]:
                lp = next(x for x in c.call("loops") if x["id"] == "motor")
                return int(lp["ticks"]), int(lp["missed"])

            _wait(lambda: drift().get("blocks", 0) >= 4, 120.0, "drift blocks", log)
            kind, sev = args.live_kind, args.live_severity
            c.call("sim-inject", {"kind": kind, "duration_s": 3600.0, "severity": sev})
            t_inj = time.monotonic()
            _wait(lambda: drift().get("state") == "drift", 120.0, "drift detected", log)
            # the fitting material (the drift task's last 64 blocks) all after the onset
            time.sleep(max(0.0, 64 * args.block * 0.010 * 1.2 - (time.monotonic() - t_inj)))
            fits: list[dict[str, Any]] = []
            window = 1.0
            for _ in range(args.live_fits):
                b0 = loop()
                time.sleep(window)
                b1 = loop()
                a0, t0 = loop(), time.monotonic()
                try:
                    r = c.call("adapt", {"model": model["name"], "dry_run": True})
                    outcome = "ok" + (" (output layer refit)" if "output_change" in r else "")
                except CommandError as exc:
                    outcome = f"refused: {exc.code}"
                wall = time.monotonic() - t0
                a1 = loop()
                window = max(wall, 0.5)
                fits.append(
                    {
                        "fit_s": round(wall, 3),
                        "outcome": outcome,
                        "ticks": a1[0] - a0[0],
                        "missed": a1[1] - a0[1],
                        "base_ticks": b1[0] - b0[0],
                        "base_missed": b1[1] - b0[1],
                    }
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return {
        "drift": f"{kind}@{sev}",
        "fits": fits,
        "missed": sum(f["missed"] for f in fits),
        "ticks": sum(f["ticks"] for f in fits),
        "base_missed": sum(f["base_missed"] for f in fits),
        "base_ticks": sum(f["base_ticks"] for f in fits),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit-windows", type=int, default=1200)
    ap.add_argument("--test-windows", type=int, default=400)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--anomaly-blocks", type=int, default=3)
    ap.add_argument("--period-ms", type=float, default=10.0)
    ap.add_argument("--severities", default="0.5,1.0")
    ap.add_argument("--kinds", default=",".join(DRIFT_KINDS))
    ap.add_argument("--no-live", dest="live", action="store_false", help="skip the live daemon")
    ap.add_argument("--live-kind", default="resonance_shift")
    ap.add_argument("--live-severity", type=float, default=1.0)
    ap.add_argument("--live-fits", type=int, default=3)
    ap.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="never refit the output layer (the calibration of the first delivery)",
    )
    args = ap.parse_args(argv)
    bench = Bench(args)
    t0 = time.perf_counter()
    rows = []
    for kind in args.kinds.split(","):
        for sev in (float(v) for v in args.severities.split(",")):
            row = bench.case(kind, sev)
            row["drift_detection_delay_s"] = bench.delay_s(kind, sev)
            rows.append(row)
            print(json.dumps(row), flush=True)
    slow = bench.slow_fault()
    print(json.dumps({"slow_fault": slow}), flush=True)
    live = live_missed_ticks(args) if args.live else None
    if live is not None:
        print(json.dumps({"live": live}), flush=True)
    adapted = [r for r in rows if r["adapted"]]
    nominal = [r for r in rows if r["severity"] == 1.0]
    out = {
        "static_false_alarm_rate": {r["kind"]: r["static_false_alarm_rate"] for r in nominal},
        "adapted_false_alarm_rate": {r["kind"]: r["adapted_false_alarm_rate"] for r in nominal},
        "adapted_detection_rate": min((r["adapted_detection_rate"] for r in adapted), default=None),
        "quarter_severity_detection_rate": {
            r["kind"]: r["quarter_severity_detection_rate"] for r in nominal
        },
        "slow_fault_absorbed": slow["absorbed"],
        "drift_detection_delay_s": {r["kind"]: r["drift_detection_delay_s"] for r in nominal},
        "fit_ms": max((r["fit_ms"] for r in adapted), default=None),
        "missed_ticks_during_adaptation": None if live is None else live["missed"],
        "ticks_during_adaptation": None if live is None else live["ticks"],
        "base_missed_ticks": None if live is None else live["base_missed"],
        "base_ticks": None if live is None else live["base_ticks"],
        "live_fit_s": None if live is None else [f["fit_s"] for f in live["fits"]],
        "live_fit_outcome": None if live is None else [f["outcome"] for f in live["fits"]],
        "federated_max_abs_err": bench.federated(),
        "refused": {f"{r['kind']}@{r['severity']}": r["refused"] for r in rows if r["refused"]},
        "cases": len(rows),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
