"""Soak and chaos run (issue #19): the simulated daemon under a seeded schedule of
overlapping faults, checked against invariants from outside. See tests/soak/harness.py.

    python benchmarks/soak.py --seconds 3600 --seed soak1-42 --report soak-report.json
    make soak SOAK_SECONDS=3600 SOAK_SEED=soak1-42

Prints each violation (if any), the work directory and how to reproduce the run, and ends
with one JSON line: duration_s, faults_injected (by kind), invariant_violations,
samples_acknowledged, samples_received, samples_in_loss_records, samples_unaccounted,
rss_slope_mb_per_h, fd_slope_per_h, max_status_latency_ms (and the seed).
Exit status 1 when any invariant was violated.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.soak.harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
