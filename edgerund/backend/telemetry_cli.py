"""`edgerund telemetry decode|consume`: fleet-side tools for the v1 wire format.

decode: one payload from FILE or stdin (`-`), or with `--hex` one hex payload per line,
        printed as JSON lines (one per block); exit 1 with the DecodeError on bad input.
consume: the reference consumer (edgerund/backend/consumer.py) against a broker; with
         `--postgres DSN` it writes to PostgreSQL exactly once (edgerund/backend/pgsink.py)
         and prints only its reports (resend requests, the final gaps and summary).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from edgerund.backend.consumer import Consumer, JsonLinesSink, SqliteSink, run
from edgerund.backend.pgsink import PostgresSink
from edgerund.telemetry import codec


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("telemetry", help="decode and consume telemetry wire payloads")
    tsub = p.add_subparsers(dest="telemetry_cmd", required=True)

    d = tsub.add_parser("decode", help="decode v1 payloads to JSON lines")
    d.add_argument("file", nargs="?", default="-", help="payload file, or - for stdin (default)")
    d.add_argument("--hex", action="store_true", help="input is hex text, one payload per line")
    d.add_argument("--meta", help="a retained meta JSON file, to name series")
    d.add_argument(
        "--public-key", action="append", default=[], help="PEM public key to verify signatures"
    )
    d.set_defaults(func=cmd_decode)

    c = tsub.add_parser("consume", help="reference consumer: subscribe, verify, dedup, report gaps")
    c.add_argument("--host", default="localhost")
    c.add_argument("--port", type=int, default=1883)
    c.add_argument("--prefix", default="tlm/v1")
    c.add_argument("--group", default="edgerund", help="shared subscription group ('' for none)")
    c.add_argument("--client-id", default=None)
    c.add_argument("--session-expiry-s", type=int, default=3600)
    c.add_argument("--tls-ca", default=None)
    c.add_argument("--tls-cert", default=None)
    c.add_argument("--tls-key", default=None)
    c.add_argument(
        "--public-key", action="append", default=[], help="PEM public key(s) of the gateways"
    )
    c.add_argument(
        "--require-signature", action="store_true", help="reject unsigned or unverifiable batches"
    )
    c.add_argument("--out", default="-", help="JSON lines file (default stdout)")
    c.add_argument(
        "--sqlite", default=None, help="write to this SQLite database instead of JSON lines"
    )
    c.add_argument(
        "--postgres",
        default=None,
        metavar="DSN",
        help="write to PostgreSQL (libpq DSN or URI), exactly once; needs a stable "
        "--client-id per member, so that a restart resumes its broker session",
    )
    c.add_argument(
        "--partition-max-age-days",
        type=int,
        default=30,
        help="PostgreSQL: create daily partitions back this far; older rows go to DEFAULT",
    )
    c.add_argument("--max-batches", type=int, default=None, help="stop after this many new batches")
    c.add_argument("--duration-s", type=float, default=None, help="stop after this many seconds")
    c.add_argument(
        "--gap-report-s", type=float, default=60.0, help="print missing sequence ranges this often"
    )
    c.add_argument(
        "--resend-after-s",
        type=float,
        default=None,
        help="request gaps open this long from the gateway with cmd/resend",
    )
    c.add_argument(
        "--operator-key",
        default=None,
        help="operator private key (PEM) that signs the cmd/resend requests (gateways run "
        "only operator-signed commands)",
    )
    c.set_defaults(func=cmd_consume)


def _operator_key(path: str | None) -> Any:
    if path is None:
        return None
    from edgerund.publisher.build import load_private

    return load_private(Path(path))


def _load_keys(paths: list[str]) -> list[Any]:
    keys = []
    for p in paths:
        with open(p, "rb") as f:
            keys.append(Consumer.load_public_key(f.read()))
    return keys


def cmd_decode(args: argparse.Namespace) -> int:
    try:
        keys = _load_keys(args.public_key)
        meta: dict[int, dict[str, Any]] | None = None
        if args.meta:
            with open(args.meta) as f:
                meta = {int(s["id"]): s for s in json.load(f).get("series", [])}
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    except (OSError, ValueError) as exc:
        print(f"edgerund telemetry decode: {exc}", file=sys.stderr)
        return 2
    if args.hex:
        try:
            payloads = [
                bytes.fromhex(line.strip().decode()) for line in data.splitlines() if line.strip()
            ]
        except ValueError as exc:
            print(f"edgerund telemetry decode: line is not hex: {exc}", file=sys.stderr)
            return 1
    else:
        payloads = [data]
    rc = 0
    for i, p in enumerate(payloads):
        try:
            dec = codec.decode(p)
        except codec.DecodeError as exc:
            where = f"payload {i + 1}: " if args.hex else ""
            print(f"edgerund telemetry decode: {where}{exc}", file=sys.stderr)
            rc = 1
            continue
        verified: bool | None = None
        if keys and dec.signature is not None:
            verified = any(codec.verify(dec, k) for k in keys)
        for rec in codec.to_json(dec, meta):
            if keys:
                rec["verified"] = verified
            print(json.dumps(rec, separators=(",", ":")))
    return rc


def cmd_consume(args: argparse.Namespace) -> int:
    try:
        consumer = Consumer(
            public_keys=_load_keys(args.public_key),
            require_signature=args.require_signature,
            prefix=args.prefix,
        )
    except (OSError, ValueError) as exc:
        print(f"edgerund telemetry consume: {exc}", file=sys.stderr)
        return 2
    out = None
    sink: JsonLinesSink | SqliteSink
    store: PostgresSink | None = None
    if args.postgres and not args.client_id:
        # A random id would leave the session of every restarted member behind, still in
        # the group and absorbing its share until it expires (docs/fleet.md §2.2).
        print(
            "edgerund telemetry consume: --postgres needs a stable --client-id per member",
            file=sys.stderr,
        )
        return 2
    if args.postgres:
        consumer.dedup = False
        try:
            store = PostgresSink(
                args.postgres,
                max_age_days=args.partition_max_age_days,
                application_name=args.client_id,
            )
        except Exception as exc:  # psycopg.Error, ImportError: say it, do not trace
            print(f"edgerund telemetry consume: postgres: {exc}", file=sys.stderr)
            return 2
    if args.sqlite:
        sink = SqliteSink(args.sqlite, consumer)
    else:
        out = sys.stdout if args.out == "-" else open(args.out, "a")
        sink = JsonLinesSink(out)
    tls = (args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        if args.duration_s is not None:
            loop.call_later(args.duration_s, stop.set)
        ready = asyncio.Event()

        async def say_ready() -> None:
            await ready.wait()
            sink.write([{"type": "ready", "client_id": args.client_id}])

        announce = asyncio.create_task(say_ready())
        await run(
            consumer,
            sink,
            host=args.host,
            port=args.port,
            group=args.group or None,
            prefix=args.prefix,
            client_id=args.client_id,
            session_expiry_s=args.session_expiry_s,
            tls=tls,
            stop=stop,
            max_batches=args.max_batches,
            gap_report_s=args.gap_report_s,
            resend_after_s=args.resend_after_s,
            store=store,
            ready=ready,
            command_key=_operator_key(args.operator_key),
        )
        announce.cancel()

    try:
        asyncio.run(main())
    finally:
        if isinstance(sink, JsonLinesSink):
            sink.write(consumer.gaps() if store is None else store.refresh_gaps())
            sink.write([{"type": "summary", **consumer.counts}])
        sink.close()
        if store is not None:
            store.close()
        if out is not None and out is not sys.stdout:
            out.close()
    return 0
