#!/usr/bin/env bash
# Set up (Debian packages, .venv) and run the daemon on the shipped simulated config:
# emulated sensors driven by the scenario generator, the reference model in the control
# loops, a software identity and a local telemetry spool. No hardware needed.
# In another terminal: .venv/bin/edgerunctl status
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh run
exec .venv/bin/edgerund run --simulate "$@"
