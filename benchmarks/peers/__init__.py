"""Real peers (mosquitto, swtpm) started on free loopback ports, for the benchmarks and
the test suite alike: plain classes and functions, no pytest. The test suite's fixtures
(tests/fixtures/) wrap them; the benchmarks use them directly, so a benchmark never
imports the test suite.
"""
