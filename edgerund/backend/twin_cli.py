"""`edgerund twin ...`: the backend side of the device twin (docs/twin.md).

    edgerund twin get GATEWAY [--site S] [--public-key PEM]      retained reported state
    edgerund twin set GATEWAY PATCH.json --version N --key OPERATOR.key [--models M.json]
    edgerund twin cmd GATEWAY NAME [ARGS.json|-] --key OPERATOR.key [--public-key PEM]
    edgerund twin watch [--site S] [--public-key PEM]           reported changes, JSON lines
    edgerund twin publish-bundle FILE [--model M --version V] [--clear]   bundle for targets

GATEWAY is the gateway id; `--site` (default `+`, any) completes the topic. With
`--public-key` (the gateway's telemetry key, `edgerunctl --json identity` signing_key_pem)
the reported documents and command replies are verified and unverifiable ones refused.
Exit 0 on success, 1 on a refusal or an error reply, 2 when the broker cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiomqtt

from edgerund.backend import twin as T


def client(args: argparse.Namespace, identifier: str | None = None) -> aiomqtt.Client:
    """An MQTT 5 session with the broker options of the backend CLIs (`--host`, ...)."""
    return aiomqtt.Client(
        args.host,
        args.port,
        username=args.username,
        password=args.password,
        protocol=aiomqtt.ProtocolVersion.V5,
        identifier=identifier,
    )


def _pem(args: argparse.Namespace) -> bytes | None:
    return Path(args.public_key).read_bytes() if args.public_key else None


def _reported(data: bytes, pem: bytes | None) -> dict[str, Any]:
    if pem is not None:
        return T.verify_reported(data, pem)
    doc = json.loads(data)
    return dict(doc.get("signed", {}))


async def _get(args: argparse.Namespace) -> int:
    pem = _pem(args)
    async with client(args) as c:
        await c.subscribe(f"{args.prefix}/{args.site}/{args.gateway}/reported", qos=1)
        async with asyncio.timeout(args.timeout_s):
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                print(json.dumps(_reported(msg.payload, pem), indent=2))
                return 0
    return 1


async def _watch(args: argparse.Namespace) -> int:
    pem = _pem(args)
    async with client(args) as c:
        await c.subscribe(f"{args.prefix}/{args.site}/+/reported", qos=1)
        async for msg in c.messages:
            if not isinstance(msg.payload, bytes) or not msg.payload:
                continue
            try:
                doc = _reported(msg.payload, pem)
            except ValueError as exc:
                print(json.dumps({"topic": str(msg.topic), "refused": str(exc)}), flush=True)
                continue
            print(json.dumps(doc, separators=(",", ":")), flush=True)
    return 0


async def _set(args: argparse.Namespace) -> int:
    from edgerund.publisher.build import load_private

    patch = json.loads(await asyncio.to_thread(Path(args.patch).read_text))
    models = json.loads(await asyncio.to_thread(Path(args.models).read_text)) if args.models else {}
    data = T.desired(
        args.gateway,
        args.version,
        patch,
        load_private(Path(args.key)),
        models=models,
        expires_s=args.expires_s,
    )
    site = args.site if args.site != "+" else None
    if site is None:
        print("error: --site is required to publish desired state", file=sys.stderr)
        return 1
    async with client(args) as c:
        await c.publish(f"{args.prefix}/{site}/{args.gateway}/desired", data, qos=1, retain=True)
    print(json.dumps({"ok": True, "gateway": args.gateway, "version": args.version}))
    return 0


async def _publish_bundle(args: argparse.Namespace) -> int:
    from edgerund.backend.bundlestore import bundle_meta, publish_bundle, unpublish_bundle

    path = Path(args.file)
    chunk = int(args.chunk_kb * 1024)
    async with client(args) as c:
        if args.clear:
            meta = await asyncio.to_thread(bundle_meta, path, chunk)
            await unpublish_bundle(c, meta)
        else:
            meta = await publish_bundle(c, path, chunk_bytes=chunk)
    target: dict[str, Any] = {"sha256": meta.sha256, "size": meta.size}
    if args.version:
        target = {"version": args.version, **target}
    out: dict[str, Any] = {args.model: target} if args.model else target
    print(json.dumps(out, indent=2))
    return 0


async def _cmd(args: argparse.Namespace) -> int:
    from edgerund.publisher.build import load_private

    if args.args in (None, ""):
        cargs: dict[str, Any] = {}
    elif args.args == "-":
        cargs = json.loads(sys.stdin.read())
    elif args.args.lstrip().startswith("{"):
        cargs = json.loads(args.args)
    else:
        cargs = json.loads(await asyncio.to_thread(Path(args.args).read_text))
    nonce = os.urandom(16).hex()
    data = T.command(args.name, args.gateway, cargs, load_private(Path(args.key)), nonce=nonce)
    base = f"{args.cmd_prefix}/{args.site}/{args.gateway}/cmd/{args.name}"
    pem = _pem(args)
    async with client(args) as c:
        await c.subscribe(f"{base}/reply", qos=1)
        await c.publish(base, data, qos=1)
        async with asyncio.timeout(args.timeout_s):
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                raw = json.loads(msg.payload)
                if "signed" not in raw:  # a refusal is unsigned (docs/twin.md §3)
                    print(json.dumps(raw))
                    return 1
                if pem is not None:
                    body = T.verify_reply(msg.payload, pem, nonce=nonce)
                elif raw["signed"].get("nonce") != nonce:
                    continue
                else:
                    body = raw["signed"]["reply"]
                print(json.dumps(body, indent=2))
                return 0 if body.get("ok") else 1
    return 1


def _run(fn: Any) -> Any:
    def go(args: argparse.Namespace) -> int:
        try:
            return int(asyncio.run(fn(args)))
        except aiomqtt.MqttError as exc:
            print(f"error: broker {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 2
        except TimeoutError:
            print("error: no answer in time", file=sys.stderr)
            return 1
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return go


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("twin", help="device twin: reported/desired state, signed commands")
    ts = p.add_subparsers(dest="twin_cmd", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--host", default="localhost")
        q.add_argument("--port", type=int, default=1883)
        q.add_argument("--username")
        q.add_argument("--password")
        q.add_argument("--site", default="+")
        q.add_argument("--prefix", default="twin/v1", help="twin topic prefix")
        q.add_argument("--cmd-prefix", default="tlm/v1", help="uplink topic prefix (cmd/*)")
        q.add_argument("--public-key", help="the gateway's telemetry public key (PEM)")
        q.add_argument("--timeout-s", type=float, default=30.0)

    g = ts.add_parser("get", help="print the retained reported state of GATEWAY")
    g.add_argument("gateway")
    common(g)
    g.set_defaults(func=_run(_get))

    w = ts.add_parser("watch", help="print reported changes (JSON lines)")
    common(w)
    w.set_defaults(func=_run(_watch))

    s = ts.add_parser("set", help="publish an operator-signed desired state")
    s.add_argument("gateway")
    s.add_argument("patch", help="JSON merge patch over the gateway's config file")
    s.add_argument("--version", type=int, required=True, help="must exceed the last one")
    s.add_argument("--key", required=True, help="operator private key (PEM)")
    s.add_argument("--models", help="JSON file of model targets")
    s.add_argument("--expires-s", type=float, default=7 * 86400.0)
    common(s)
    s.set_defaults(func=_run(_set))

    b = ts.add_parser(
        "publish-bundle",
        help="publish a bundle retained on bundles/v1/{sha256}/ for model targets;"
        " print the target (for `set --models`)",
    )
    b.add_argument("file", help="the signed bundle file")
    b.add_argument("--model", help="wrap the target as {MODEL: target}")
    b.add_argument("--version", help="the bundle's model version, copied into the target")
    b.add_argument("--chunk-kb", type=float, default=128.0, help="<= gateways' mqtt_chunk_max_kb")
    b.add_argument("--clear", action="store_true", help="remove the retained messages instead")
    common(b)
    b.set_defaults(func=_run(_publish_bundle))

    c = ts.add_parser("cmd", help="send an operator-signed command, print the signed reply")
    c.add_argument("gateway")
    c.add_argument("name")
    c.add_argument("args", nargs="?", help="JSON object, a JSON file, or - for stdin")
    c.add_argument("--key", required=True, help="operator private key (PEM)")
    common(c)
    c.set_defaults(func=_run(_cmd))
