"""`edgerund fleet rollout|resume|status|abort|devices` (docs/fleet.md §8).

    edgerund fleet rollout BUNDLE --select 'site=plant-*' --waves 1,10%,50%,100% \\
        --halt-if 'rolled_back>0 or failed_rate>2%' --soak 10m --key OPERATOR.key \\
        --postgres DSN [--host H --port P] [--id ID] [--gateway-timeout 15m]
    edgerund fleet rollout --resume ID --key OPERATOR.key --postgres DSN   (= fleet resume ID)
    edgerund fleet status [ID] --postgres DSN [--json]
    edgerund fleet abort ID --postgres DSN [--revert --key OPERATOR.key --host H]
    edgerund fleet devices [--select S] [--json] [--postgres DSN] [--host H]

`--postgres` defaults to $EDGERUND_POSTGRES. Exit status of rollout/resume: 0 succeeded,
1 halted or aborted or refused (bad selector, nobody to update), 2 broker or database
unreachable. Progress goes to standard output, one line per event (`--json`: JSON lines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt

from edgerund.backend import rolloutspec as S
from edgerund.backend import twin_cli
from edgerund.backend.rollout_run import Emit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def duration_s(text: str) -> float:
    """`10m`, `30s`, `1.5h`, `500ms`, `2d` or plain seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 30s, 10m, 1h; got {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
    return float(m.group(1)) * scale


def _client(args: argparse.Namespace) -> aiomqtt.Client:
    return twin_cli.client(args, identifier=f"edgerund-fleet-{os.getpid()}")


def _dsn(args: argparse.Namespace) -> str:
    dsn = args.postgres or os.environ.get("EDGERUND_POSTGRES")
    if not dsn:
        raise ValueError("--postgres DSN (or $EDGERUND_POSTGRES) is required")
    return str(dsn)


def _store(args: argparse.Namespace) -> Any:
    from edgerund.backend.rollout_store import RolloutStore

    return RolloutStore(_dsn(args))


def _emitter(args: argparse.Namespace) -> Emit:
    def emit(ev: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(ev, separators=(",", ":")), flush=True)
            return
        kind = ev.pop("event")
        text = " ".join(f"{k}={v}" for k, v in ev.items())
        print(f"{time.strftime('%H:%M:%S')} {kind} {text}", flush=True)

    return emit


async def _rollout(args: argparse.Namespace) -> int:
    """Plan (or resume) and drive; a lost broker connection is retried with a capped,
    jittered backoff by resuming from the database (nothing is lost: every decision is
    there before it is acted on)."""
    from edgerund.backend.rollout_run import Driver, TwinCache
    from edgerund.publisher.build import load_private

    rid = args.resume or getattr(args, "rollout_id", None)
    if not rid and not args.bundle:
        raise ValueError("BUNDLE or --resume ID")
    key = load_private(Path(args.key))
    store = await asyncio.to_thread(_store, args)
    keys = Path(args.gateway_keys) if args.gateway_keys else None
    emit = _emitter(args)
    backoff = 1.0
    try:
        while True:
            try:
                async with _client(args) as client, TwinCache(client, args.prefix, keys) as cache:
                    drv = Driver(store, client, cache, key, emit=emit, poll_s=args.poll_s)
                    if rid:
                        r, info, docs = await drv.resume(rid)
                    else:
                        r, info = await drv.plan(
                            Path(args.bundle),
                            selector=args.select,
                            waves=args.waves,
                            halt_if=args.halt_if,
                            soak_s=args.soak,
                            timeout_s=args.gateway_timeout,
                            rollout_id=args.id,
                            discover_s=args.discover_s,
                        )
                        docs = {}
                        rid = r.id
                    backoff = 1.0
                    state = await drv.run(r, info, docs)
                    break
            except aiomqtt.MqttError as exc:
                if not rid:
                    raise  # nothing planned yet: report the broker as unreachable
                delay = min(backoff, 30.0) * random.uniform(0.5, 1.0)
                emit({"event": "broker_lost", "rollout": rid, "error": str(exc),
                      "retry_in_s": round(delay, 1)})  # fmt: skip
                await asyncio.sleep(delay)
                backoff *= 2
    finally:
        await asyncio.to_thread(store.close)
    return 0 if state == "succeeded" else 1


async def _abort(args: argparse.Namespace) -> int:
    from edgerund.backend.rollout_run import TwinCache, revert
    from edgerund.publisher.build import load_private

    store = await asyncio.to_thread(_store, args)
    emit = _emitter(args)
    try:
        state = await asyncio.to_thread(store.abort, args.rollout_id, args.reason)
        emit({"event": "abort", "rollout": args.rollout_id, "state": state})
        if args.revert:
            if not args.key:
                raise ValueError("--revert needs --key OPERATOR.key")
            key = load_private(Path(args.key))
            async with _client(args) as client, TwinCache(client, args.prefix) as cache:
                n = await revert(store, client, cache, key, args.rollout_id, emit)
            emit({"event": "reverted_total", "gateways": n})
    finally:
        await asyncio.to_thread(store.close)
    return 0


def _status(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if not args.rollout_id:
            rows = store.list()
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                for r in rows:
                    print(
                        f"{r['id']}  {r['model']} {r['version']}  {r['state']}  wave "
                        f"{r['wave']}/{r['waves']}  reached {r['reached']}/{r['gateways']}  "
                        f"committed {r['committed']}  failed {r['failed']}"
                        + (f"  overridden {r['overridden']}" if r["overridden"] else "")
                        + (f"  ({r['reason']})" if r["reason"] else "")
                    )
            return 0
        r, info, docs = store.load(args.rollout_id)
    finally:
        store.close()
    counts = {k: int(v) for k, v in r.counts().items() if not k.endswith("_rate")}
    doc = {
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "sha256": info.sha256,
        "selector": info.selector,
        "waves": info.waves,
        "wave_ends": r.waves,
        "halt_if": r.halt_if,
        "soak_s": r.soak_s,
        "timeout_s": r.timeout_s,
        "state": r.state,
        "wave": r.wave + 1,
        "soak_until": r.soak_until,
        "reason": r.reason,
        "counts": counts,
        "targets": [
            {
                "gateway": t.gateway,
                "site": t.site,
                "wave": t.wave + 1 if t.wave >= 0 else None,
                "status": t.status,
                "outcome": t.outcome,
                "reason": t.reason,
                "prev_version": t.prev_version,
                "desired_version": docs[t.gateway].version if t.gateway in docs else None,
            }
            for t in sorted(r.targets.values(), key=lambda t: (t.wave < 0, t.wave, t.gateway))
        ],
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(
        f"{r.id}: {r.model} {r.version} ({info.sha256[:12]}) {r.state}, wave {r.wave + 1}/{len(r.waves)}"
    )
    if r.reason:
        print(f"  {r.reason}")
    print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for t in doc["targets"]:
        extra = " ".join(str(x) for x in (t["outcome"], t["reason"]) if x)
        print(f"  wave {t['wave'] or '-'}  {t['gateway']:<20} {t['status']:<10} {extra}".rstrip())
    return 0


async def _devices(args: argparse.Namespace) -> int:
    from edgerund.backend.fleetview import device_row, render
    from edgerund.backend.rollout_run import TwinCache

    sel = S.parse_selector(args.select)
    keys = Path(args.gateway_keys) if args.gateway_keys else None
    async with _client(args) as client, TwinCache(client, args.prefix, keys) as cache:
        await cache.settle(quiet_s=args.quiet_s, max_s=args.discover_s)
    now_ms = int(time.time() * 1000)
    reps = {g: d for g, d in sorted(cache.reported.items()) if sel.matches(S.facts_of(d))}
    rows = [device_row(d, now_ms) for d in reps.values()]
    if args.postgres or os.environ.get("EDGERUND_POSTGRES"):
        store = await asyncio.to_thread(_store, args)
        try:
            for g, d in reps.items():
                await asyncio.to_thread(
                    store.upsert_twin, g, cache.sites.get(g), d, cache.desired.get(g)
                )
        finally:
            await asyncio.to_thread(store.close)
    if args.json:
        print(json.dumps({"devices": rows, "unverified": cache.refused}, indent=1))
    else:
        print(render(rows))
        for g, why in sorted(cache.refused.items()):
            print(f"# {g}: reported state not taken: {why}", file=sys.stderr)
    return 0


def _run(fn: Any) -> Any:
    def go(args: argparse.Namespace) -> int:
        try:
            out = fn(args)
            return int(asyncio.run(out) if asyncio.iscoroutine(out) else out)
        except aiomqtt.MqttError as exc:
            print(f"error: broker {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 2
        except S.RolloutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyError as exc:
            print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 1
        except (OSError, ValueError, RuntimeError) as exc:
            name = type(exc).__module__
            print(f"error: {exc}", file=sys.stderr)
            return 2 if name.startswith("psycopg") else 1

    return go


def register(fsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def broker(q: argparse.ArgumentParser) -> None:
        q.add_argument("--host", default="localhost")
        q.add_argument("--port", type=int, default=1883)
        q.add_argument("--username")
        q.add_argument("--password")
        q.add_argument("--prefix", default="twin/v1", help="twin topic prefix")
        q.add_argument(
            "--gateway-keys",
            help="directory of GATEWAY.pem telemetry public keys: take only reported "
            "states whose gateway signature verifies",
        )

    def db(q: argparse.ArgumentParser) -> None:
        q.add_argument("--postgres", help="PostgreSQL DSN (default $EDGERUND_POSTGRES)")
        q.add_argument("--json", action="store_true", help="JSON output")

    r = fsub.add_parser("rollout", help="staged model rollout, wave by wave, halting on a rule")
    r.add_argument("bundle", nargs="?", help="the signed model bundle file")
    r.add_argument("--select", default="", help="key=glob[,key=glob...] over reported twins")
    r.add_argument("--waves", default="1,10%,50%,100%", help="cumulative wave sizes")
    r.add_argument("--halt-if", default="failed>0", help="halt rule (docs/fleet.md §8)")
    r.add_argument("--soak", type=duration_s, default=600.0, help="wait after each wave (10m)")
    r.add_argument(
        "--gateway-timeout", type=duration_s, default=900.0,
        help="a gateway without an outcome this long after its target counts as failed",
    )  # fmt: skip
    r.add_argument("--key", required=True, help="operator private key (PEM)")
    r.add_argument("--id", help="rollout id (default MODEL-VERSION-TIMESTAMP)")
    r.add_argument("--resume", metavar="ID", help="continue rollout ID from the database")
    r.add_argument("--discover-s", type=float, default=10.0, help="max wait for retained twins")
    r.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    broker(r)
    db(r)
    r.set_defaults(func=_run(_rollout))

    rs = fsub.add_parser("resume", help="continue a rollout after the tool stopped")
    rs.add_argument("rollout_id")
    rs.add_argument("--key", required=True, help="operator private key (PEM)")
    rs.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    broker(rs)
    db(rs)
    rs.set_defaults(func=_run(_rollout), bundle=None, resume=None)

    s = fsub.add_parser("status", help="rollouts, or one rollout's gateways")
    s.add_argument("rollout_id", nargs="?")
    db(s)
    s.set_defaults(func=_run(_status))

    a = fsub.add_parser("abort", help="stop a rollout; --revert sets the previous target back")
    a.add_argument("rollout_id")
    a.add_argument("--revert", action="store_true")
    a.add_argument("--key", help="operator private key (PEM), for --revert")
    a.add_argument("--reason", default="aborted by the operator")
    broker(a)
    db(a)
    a.set_defaults(func=_run(_abort))

    d = fsub.add_parser("devices", help="one line per gateway from the reported twins")
    d.add_argument("--select", default="", help="key=glob[,key=glob...]")
    d.add_argument("--discover-s", type=float, default=10.0)
    d.add_argument("--quiet-s", type=float, default=1.0, help=argparse.SUPPRESS)
    broker(d)
    db(d)
    d.set_defaults(func=_run(_devices))
