"""`edgerund fleet ...`: rollouts and device views (rollout_cli.py) and

`edgerund fleet calibration`: merge many gateways' drift statistics into a fleet fit.

Input: JSON documents (one per line, or files holding one document each) in the
`edgerund.fedstats/1` format, as the gateways' `drift.stats` telemetry events carry them
(the event's fields; `model`/`version` must agree across inputs). With `--manifest` (the
model's manifest.json), shifts and scales are expressed against its reference profile.
Output: one JSON object: the merged count, per-feature mean/std, shift in reference sd,
scale, the fleet score quantile, the number of gateways merged. A publisher reviews it
and signs it into the next bundle; nothing here touches a device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgerund.inference import federated


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="fleet tools: rollouts, devices, calibration")
    fsub = p.add_subparsers(dest="fleet_cmd", required=True)
    c = fsub.add_parser("calibration", help="merge gateways' statistics into a fleet fit")
    c.add_argument("inputs", nargs="+", help="JSON(-lines) files of edgerund.fedstats/1 documents")
    c.add_argument("--manifest", help="the model's manifest.json (reference profile)")
    c.add_argument("--quantile", type=float, default=0.999)
    c.add_argument("-o", "--output", default="-")
    c.set_defaults(func=cmd_calibration)
    from edgerund.backend import rollout_cli

    rollout_cli.register(fsub)


def _docs(path: str) -> list[dict[str, Any]]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    text = text.strip()
    if text.startswith("{") and "\n{" not in text:
        return [json.loads(text)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cmd_calibration(args: argparse.Namespace) -> int:
    docs = [d for p in args.inputs for d in _docs(p)]
    docs = [d.get("fields", d) for d in docs]  # a raw event: its fields hold the stats
    models = {(d.get("model"), d.get("version")) for d in docs}
    if len(models) > 1:
        print(f"error: statistics of different models: {sorted(map(str, models))}", file=sys.stderr)
        return 1
    merged = federated.merge(federated.decode(d) for d in docs)
    n = merged.sum.shape[0]
    mu, sd = np.zeros(n), np.ones(n)
    if args.manifest:
        prof = json.loads(Path(args.manifest).read_text()).get("reference_profile") or {}
        feats = prof.get("features") or {}
        if feats.get("mean") and feats.get("std"):
            mu, sd = np.asarray(feats["mean"]), np.asarray(feats["std"])
    fit = federated.fleet_fit(merged, mu_ref=mu, sd_ref=sd, quantile=args.quantile)
    model, version = next(iter(models))
    out = {
        "model": model,
        "version": version,
        "gateways": len(docs),
        "count": fit["count"],
        "mean": fit["mean"].tolist(),
        "std": fit["std"].tolist(),
        "shift_sd": fit["shift_sd"].tolist(),
        "scale": fit["scale"].tolist(),
        "score_quantile": fit["score_quantile"],
        "quantile": args.quantile,
    }
    text = json.dumps(out, indent=1) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0
