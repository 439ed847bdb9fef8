"""`edgerunctl loops` text: one block per loop, sparkline against the threshold."""

from __future__ import annotations

from edgerund.control.render import BARS, format_loops, sparkline


def test_sparkline_scales_and_marks_gaps() -> None:
    assert (
        sparkline([0.0, 1.0, 2.0, None, 5.0], top=2.0)
        == BARS[0] + BARS[4] + BARS[7] + " " + BARS[7]
    )
    assert sparkline([], top=1.0) == ""
    assert sparkline([None, None]) == "  "
    assert len(sparkline([1.0] * 100, width=60)) == 60


def test_format_loops_block() -> None:
    row = {
        "id": "motor",
        "period_ms": 10,
        "ticks": 100,
        "missed": 2,
        "mode": "fallback",
        "reason": "model m: not loaded",
        "lateness_ms": {"p50": 0.001, "p99": 0.2, "max": 1.5},
        "latency_ms": {"p50": 1.2, "p99": 1.9, "max": 3.0},
        "sample_age_ms": {"p50": None, "p99": None, "max": None},
        "actuation_ms": {"p50": 0.05, "p99": 0.1, "max": 0.2},
        "inference_us": {"p50": 20.0, "p99": 40.0, "max": 90.0},
        "model": "m",
        "model_version": None,
        "score": None,
        "threshold": 3.0,
        "scores": [1.0, None, 6.0],
        "anomaly": True,
        "anomalies": 1,
        "actuator": {
            "driver": "gpio",
            "output": "active",
            "value": 1.0,
            "state": "failed",
            "error": "timeout",
            "writes": 7,
            "errors": 2,
        },
    }
    text = format_loops([row])
    assert text.splitlines()[0] == "motor  every 10 ms  mode fallback  ticks 100  missed 2"
    assert "reason         model m: not loaded" in text
    assert "p50 0.001  p99 0.2  max 1.5" in text
    assert "m (not loaded)" in text and "ANOMALY" in text
    assert "gpio: active = 1  failed  writes 7  errors 2  error: timeout" in text
    assert format_loops([]) == "loops: none configured"
