"""Human rendering of the `loops` command for `edgerunctl loops` (pure: rows in, text out).

A loop row has two dozen keys (docs/control.md), too many for one table line, so each
loop is printed as a short block: timing figures as p50/p99/max, the mode and why, the
model and its recent scores as a sparkline against the threshold, and the actuator.
`edgerund/ctl/cli.py` calls `format_loops(result)` for the `loops` command unless `--json`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], top: float | None = None, width: int = 60) -> str:
    """One character per value (the newest `width`), scaled from 0 to `top` (or the max).

    A missing value (no score on that tick: fallback/safe mode) is a space; values above
    `top` are drawn as the full bar.
    """
    vals = list(values)[-width:]
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    if not finite:
        return " " * len(vals)
    hi = top if top is not None and top > 0 else max(max(finite), 1e-12)
    out = []
    for v in vals:
        if v is None or not math.isfinite(v):
            out.append(" ")
            continue
        frac = min(max(v / hi, 0.0), 1.0)
        out.append(BARS[min(len(BARS) - 1, int(frac * (len(BARS) - 1) + 0.5))])
    return "".join(out)


def _n(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1000 else f"{round(v, digits):g}"
    return str(v)


def _h(d: Any) -> str:
    if not isinstance(d, dict):
        return "-"
    return f"p50 {_n(d.get('p50'))}  p99 {_n(d.get('p99'))}  max {_n(d.get('max'))}"


def format_loop(r: dict[str, Any]) -> str:
    model = r.get("model")
    head = (
        f"{r.get('id')}  every {r.get('period_ms')} ms  mode {r.get('mode') or '-'}"
        f"  ticks {r.get('ticks')}  missed {r.get('missed')}"
    )
    lines = [head]
    if r.get("reason"):
        lines.append(f"  reason         {r['reason']}")
    lines += [
        f"  lateness ms    {_h(r.get('lateness_ms'))}",
        f"  latency ms     {_h(r.get('latency_ms'))}   (sample -> actuation)",
        f"  sample age ms  {_h(r.get('sample_age_ms'))}",
        f"  actuation ms   {_h(r.get('actuation_ms'))}",
    ]
    if model is not None:
        thr = r.get("threshold")
        # one fact per line so the block fits 80 columns (the sparkline is 60 wide)
        lines += [
            f"  model          {model} {r.get('model_version') or '(not loaded)'}",
            f"  inference us   {_h(r.get('inference_us'))}",
            f"  score          {_n(r.get('score'))} / threshold {_n(thr)}",
            f"  scores         [{sparkline(r.get('scores') or [], top=2 * thr if thr else None)}]",
        ]
    state = "ANOMALY" if r.get("anomaly") else "normal"
    lines += [
        f"  state          {state}  ({r.get('anomalies', 0)} since start,"
        f" {r.get('model_faults', 0)} model faults)",
        f"  ticks          {r.get('fallback_ticks', 0)} fallback, {r.get('safe_ticks', 0)} safe",
    ]
    a = r.get("actuator")
    if isinstance(a, dict):
        err = f"  error: {a['error']}" if a.get("error") else ""
        lines.append(
            f"  actuator       {a.get('driver')}: {a.get('output') or '-'} = {_n(a.get('value'))}"
            f"  {a.get('state')}  writes {_n(a.get('writes'))}  errors {a.get('errors')}{err}"
        )
    else:
        lines.append("  actuator       none (detect and report only)")
    return "\n".join(_fit(line) for line in lines)


WIDTH = 80  # a technician's terminal, or a pipe


def _fit(line: str) -> str:
    """Long free text (a fault reason, an actuator error) continues under its value column."""
    if len(line) <= WIDTH:
        return line
    return textwrap.fill(line, WIDTH, subsequent_indent=" " * 17, break_long_words=True)


def format_loops(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "loops: none configured"
    return "\n\n".join(format_loop(r) for r in rows)
