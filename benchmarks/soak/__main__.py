"""`python -m benchmarks.soak`: one soak run.

Prints each violation (if any), the work directory and how to reproduce the run, and ends
with one JSON line: duration_s, faults_injected (by kind), invariant_violations,
samples_acknowledged, samples_received, samples_in_loss_records, samples_unaccounted,
rss_slope_mb_per_h, fd_slope_per_h, max_status_latency_ms (and the seed).
Exit status 1 when any invariant was violated.
"""

from __future__ import annotations

import sys

from benchmarks.soak.harness import main

if __name__ == "__main__":
    sys.exit(main())
