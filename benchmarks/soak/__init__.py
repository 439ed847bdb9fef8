"""Soak and chaos run (issue #19): the simulated daemon under a seeded schedule of
overlapping faults, checked against invariants from outside (harness.py explains the theory
of operation). The CI profile and the regression tests live in tests/soak and import this
package; nothing here imports the test suite.

    python -m benchmarks.soak --seconds 3600 --seed soak1-42 --report soak-report.json
    make soak SOAK_SECONDS=3600 SOAK_SEED=soak1-42
"""
