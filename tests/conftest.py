"""Shared fixtures. Real peers live in tests/fixtures/ (one module each)."""

pytest_plugins = [
    "tests.fixtures.binaries",
    "tests.fixtures.mosquitto",
    "tests.fixtures.postgres",
    "tests.fixtures.swtpm",
    "tests.fixtures.loopguard",
]
