"""Start-up time and memory of the daemon in simulated mode.

Figures, measured in the same run so that a shared, noisy machine affects both sides:
- ready_s: exec of `edgerund run --simulate` to READY=1 on a fake $NOTIFY_SOCKET;
- rss_mb: the daemon's VmRSS after --settle-s (default 30) seconds of running;
- import_only_s / import_only_rss_mb: a bare `python -c "import onnxruntime, numpy"`,
  the floor that any daemon using these libraries pays.
Targets (issue 2): READY <= 1.5 s, RSS <= 100 MB. The last line is one JSON object.

    python benchmarks/startup.py [--settle-s 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgerund.config.loader import simulate_config_path  # noqa: E402
from tests.helpers.daemon import DaemonProcess  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def import_only() -> tuple[float, float]:
    code = (
        "import time, sys; t0 = float(sys.argv[1]); import onnxruntime, numpy; "
        "print(time.time() - t0); print(open('/proc/self/status').read())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, repr(time.time())], capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    elapsed = float(lines[0])
    rss = next(int(ln.split()[1]) / 1024 for ln in lines if ln.startswith("VmRSS:"))
    return elapsed, rss


def daemon_run(settle_s: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="edgerund-bench-") as tmp:
        tmp_path = Path(tmp)
        cfg = yaml.safe_load(simulate_config_path().read_text())
        cfg.setdefault("paths", {})["state_dir"] = str(tmp_path / "state")
        cfg["paths"]["run_dir"] = str(tmp_path / "run")
        cfg.setdefault("diag", {})["socket"] = str(tmp_path / "diag.sock")
        cfg.setdefault("logging", {})["format"] = "json"
        d = DaemonProcess(tmp_path, config_text=yaml.safe_dump(cfg), simulate=True)
        d.socket_path = str(tmp_path / "diag.sock")
        with d:
            ready = d.wait_ready(60)
            time.sleep(settle_s)
            assert d.proc is not None
            rss = rss_mb(d.proc.pid)
            rc = d.stop()
            if rc != 0:
                raise SystemExit(f"daemon exited {rc}:\n{d.log_text[-3000:]}")
        return ready, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settle-s", type=float, default=30.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    imp = [import_only() for _ in range(args.runs)]
    runs = [daemon_run(args.settle_s if i == 0 else 1.0) for i in range(args.runs)]
    import_s = statistics.median(t for t, _ in imp)
    import_rss = statistics.median(r for _, r in imp)
    ready_s = statistics.median(t for t, _ in runs)
    rss = runs[0][1]
    print(f"import onnxruntime+numpy only: {import_s:.3f} s, {import_rss:.1f} MB RSS")
    print(
        f"daemon --simulate: READY after {ready_s:.3f} s "
        f"({ready_s / import_s:.2f}x the bare imports), "
        f"RSS {rss:.1f} MB after {args.settle_s:g} s ({rss / import_rss:.2f}x the imports)"
    )
    print(
        f"targets: READY <= 1.5 s ({'met' if ready_s <= 1.5 else 'NOT met'}), "
        f"RSS <= 100 MB ({'met' if rss <= 100 else 'NOT met'})"
    )
    print(
        json.dumps(
            {
                "ready_s": round(ready_s, 3),
                "rss_mb": round(rss, 1),
                "import_only_s": round(import_s, 3),
                "import_only_rss_mb": round(import_rss, 1),
                "ready_vs_import_ratio": round(ready_s / import_s, 2),
                "rss_vs_import_ratio": round(rss / import_rss, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
