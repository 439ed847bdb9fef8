#!/usr/bin/env bash
# Set up (Debian packages incl. mosquitto, swtpm, tpm2-tools, debootstrap; .venv with the
# test extras) and run the whole test suite: lint, types, then pytest against real peers.
# Extra arguments go to pytest (e.g. scripts/test.sh -k config).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check edgerund drivers tests benchmarks models
.venv/bin/ruff format --check edgerund drivers tests benchmarks models
.venv/bin/mypy
set +e
.venv/bin/python -m pytest -ra -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
exit "$rc"
