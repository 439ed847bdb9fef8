"""Benchmark: a signed update of the reference model applied by the running daemon while its
100 Hz control loop runs the model.

Everything is the shipped thing: `edgerund run --simulate` as a child process (the real
hub over the emulated plant, the `motor` loop running the reference model at 100 Hz, the
slot repository and update steps, the precheck child process, the file counter of the
software identity, the configured probation), driven over its diagnostics socket like
`edgerunctl update` does. The bundles are real: the reference model directory
(models/reference, without the fp32 twin) packed and signed with the development key the
simulated config trusts (edgerund/publisher/build.py, as `edgerund bundle build` does),
each with a new version and security counter, plus a signed `pad.bin` payload so that the
bundle is ~1 MB (`--size-mb`).

Per install (`--reps`, default 3), timed from the `update` request:
  - `apply_to_probation`: until the answer that the new model is swapped in and on
    probation (read, signature and hashes checked, staged with fsync, precheck child run,
    the previous model's miss-rate baseline measured over min(probation, 10 s), slot
    switched, counter raised, model loaded and swapped into the loop);
  - `apply_1mb_s`: the same minus that baseline window (a plain wait of the update steps,
    policy, not cost: comparable with the earlier "probation 0" figure);
  - `commit`: until `models-slots` says COMMITTED, i.e. after the probation
    (`--probation-s`; default: the simulated config's `updates.probation_s`), during which
    the probation watches the loop's missed ticks;
  - `rollback_ms`: a rollback by hand (`rollback`) after the last commit.
A probation that fails (the daemon rolls the new model back) is reported in `outcomes`
with its reason; `commit_1mb_s` is over the installs that committed. The daemon runs at
the shipped unit's `Nice=` (`--nice`, 0 for none), as systemd would start it.
The loop's missed ticks are read from `status` (the `motor` loop) over the whole update
window (first request to the last outcome, rollback included), and over an equal window
right after it with no update: the same-run baseline (on a loaded machine the idle loop misses
ticks too; the ratio says what the update adds).

    python benchmarks/update.py [--reps 3] [--size-mb 1] [--probation-s S]

Ends with one JSON line of all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.peers import unit  # noqa: E402
from edgerund.errors import CommandError  # noqa: E402
from edgerund.publisher import build as B  # noqa: E402
from edgerund.toolkit.daemonproc import DaemonProc, simulated  # noqa: E402

REF = REPO / "models" / "reference"
DEV_KEY = REPO / "models" / "dev-keys" / "DEVELOPMENT-ONLY.key"
MODEL = "motor-ae"
LOOP = "motor"


def make_bundles(work: Path, reps: int, size_mb: float, probation_s: float | None) -> list[Path]:
    """`reps` signed bundles of the reference model, versions 2.0.1.., counters 2.., each
    padded to ~size_mb with a signed payload file."""
    key = B.load_private(DEV_KEY)
    src = work / "model"
    shutil.copytree(REF, src, ignore=shutil.ignore_patterns("model_fp32.onnx"))
    body = sum(p.stat().st_size for p in src.iterdir())
    pad = max(0, int(size_mb * (1 << 20)) - body - 40 * 1024)  # manifest, sig, golden-io
    health = {} if probation_s is None else {"probation_s": probation_s}
    out = []
    for i in range(reps):
        (src / "pad.bin").write_bytes(os.urandom(pad))
        b = work / f"motor-ae-2.0.{i + 1}.bundle"
        B.build_from_dir(
            src, b, [key], version=f"2.0.{i + 1}", security_counter=2 + i, health=health
        )
        out.append(b)
    return out


def loop_status(d: DaemonProc) -> dict[str, Any]:
    return next(lp for lp in d.call("status")["loops"] if lp["id"] == LOOP)


def slot_state(d: DaemonProc) -> dict[str, Any]:
    return next(r for r in d.call("models-slots") if r["name"] == MODEL)


def wait_outcome(d: DaemonProc, version: str, timeout_s: float) -> tuple[float, str]:
    """(when, outcome): COMMITTED, or the failure reason of a rollback (e.g. the probation
    judged the new model unhealthy)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = slot_state(d)
        if rec["state"] == "COMMITTED" and rec["version"] == version:
            return time.monotonic(), "COMMITTED"
        lf = rec.get("last_failure") or {}
        if rec["state"] in ("ROLLED_BACK", "REJECTED") and lf.get("version") == version:
            return time.monotonic(), f"{rec['state']}: {lf.get('reason')}: {lf.get('message')}"
        time.sleep(0.05)
    raise RuntimeError(f"{version}: no outcome within {timeout_s} s: {slot_state(d)}")


def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="edgerund-bench-update-"))
    bundles = make_bundles(work / "pub", args.reps, args.size_mb, args.probation_s)
    sizes = [b.stat().st_size for b in bundles]
    d = simulated(
        work / "gw", {"logging": {"level": "warning"}}, prefix=unit.nice_prefix(args.nice)
    )
    upd = d.config["updates"]
    probation_s = (
        args.probation_s if args.probation_s is not None else float(upd.get("probation_s", 30.0))
    )
    # the update steps measure the old model's miss rate this long before the swap
    baseline_s = min(probation_s, float((upd.get("probation") or {}).get("baseline_max_s", 10.0)))
    try:
        with d:
            d.wait_ready(120)
            time.sleep(args.settle_s)
            apply_s: list[float] = []
            commit_s: list[float] = []
            outcomes: list[str] = []
            # the update window first, then as long again idle: the baseline follows the
            # same warm daemon (a fresh one misses more in its first seconds)
            lp0 = loop_status(d)
            t_start = time.monotonic()
            for b in bundles:
                version = b.name.removeprefix(f"{MODEL}-").removesuffix(".bundle")
                t0 = time.monotonic()
                try:
                    d.call("update", {"path": str(b), "wait": "trial"}, timeout_s=300)
                except CommandError as exc:  # refused or rolled back before the trial
                    outcomes.append(f"{version}: {exc}")
                    continue
                apply_s.append(time.monotonic() - t0)
                t_end, outcome = wait_outcome(d, version, probation_s + 120)
                outcomes.append(outcome)
                if outcome == "COMMITTED":
                    commit_s.append(t_end - t0)
            t0 = time.monotonic()
            rollback_ms: float | None = None
            try:
                d.call("rollback", {"model": MODEL}, timeout_s=60)
                rollback_ms = (time.monotonic() - t0) * 1e3
            except CommandError as exc:  # e.g. the last install was rolled back already
                outcomes.append(f"rollback by hand refused: {exc}")
            window_s = time.monotonic() - t_start
            lp1 = loop_status(d)
            time.sleep(window_s)
            lp2 = loop_status(d)
            final = slot_state(d)
    finally:
        d.stop()
    missed = lp1["missed"] - lp0["missed"]
    idle_missed = lp2["missed"] - lp1["missed"]
    ticks = lp1["ticks"] - lp0["ticks"]
    idle_ticks = lp2["ticks"] - lp1["ticks"]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "bundle_bytes": statistics.median(sizes),
        "apply_1mb_s": round(statistics.median(apply_s) - baseline_s, 3) if apply_s else None,
        "apply_1mb_max_s": round(max(apply_s) - baseline_s, 3) if apply_s else None,
        "apply_to_probation_s": round(statistics.median(apply_s), 3) if apply_s else None,
        "baseline_window_s": baseline_s,
        "commit_1mb_s": round(statistics.median(commit_s), 3) if commit_s else None,
        "commit_minus_probation_s": (
            round(statistics.median(commit_s) - probation_s, 3) if commit_s else None
        ),
        "probation_s": probation_s,
        "rollback_ms": None if rollback_ms is None else round(rollback_ms, 1),
        "installs": len(apply_s),
        "committed": len(commit_s),
        "outcomes": outcomes,
        "nice": args.nice,
        "window_s": round(window_s, 1),
        "missed_ticks": missed,
        "ticks": ticks,
        "missed_ticks_idle_baseline": idle_missed,
        "idle_ticks": idle_ticks,
        "missed_per_1k_ticks_update": round(1000 * missed / max(ticks + missed, 1), 2),
        "missed_per_1k_ticks_idle": round(1000 * idle_missed / max(idle_ticks + idle_missed, 1), 2),
        "loop_lateness_p99_ms_at_end": lp2.get("lateness_ms", {}).get("p99"),
        "final_state": final.get("state"),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "loop_period_ms": lp0.get("period_ms"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=3, help="installs, one after another")
    ap.add_argument("--size-mb", type=float, default=1.0, help="bundle size (padded)")
    ap.add_argument(
        "--probation-s",
        type=float,
        default=None,
        help="the bundles' health.probation_s (default: none, the config's updates.probation_s)",
    )
    ap.add_argument("--settle-s", type=float, default=5.0, help="after READY, before measuring")
    ap.add_argument(
        "--nice",
        type=int,
        default=unit.nice(),
        help="run the daemon at this nice level (default: the shipped unit's Nice=)",
    )
    args = ap.parse_args()
    r = bench(args)
    print(
        f"apply {r['bundle_bytes'] / 1e6:.2f} MB bundle: {r['apply_1mb_s']} s median "
        f"(max {r['apply_1mb_max_s']}) of work; request -> swapped in, on probation "
        f"{r['apply_to_probation_s']} s with the {r['baseline_window_s']:g} s baseline window"
    )
    print(
        f"to COMMITTED: {r['commit_1mb_s']} s (probation {r['probation_s']:g} s; "
        f"{r['commit_minus_probation_s']} s besides it); {r['committed']} of "
        f"{r['installs']} committed: {r['outcomes']}"
    )
    print(f"rollback by hand: {r['rollback_ms']} ms")
    print(
        f"loop '{LOOP}' @100 Hz: missed {r['missed_ticks']} of {r['ticks']} ticks during "
        f"{r['installs']} updates ({r['window_s']} s); same time without update: "
        f"{r['missed_ticks_idle_baseline']} of {r['idle_ticks']} "
        f"(per 1k: {r['missed_per_1k_ticks_update']} vs {r['missed_per_1k_ticks_idle']}); "
        f"load average {r['load_average_1m']}"
    )
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
