"""Remote (MQTT `cmd/{name}`) commands: telemetry's own, and the dispatch of every one.

Theory of operation
-------------------
The composition root makes one `RemoteCommands` router. Components that serve a remote
command register a handler with it (updates registers `update`); telemetry registers its
own three here (`TelemetryCommands.register`):

* `resend` {epoch, from_seq, to_seq}: mark kept (delivered) batches undelivered again so
  the uplink sends them once more; answers how many were requeued and how many are gone.
* `upload_raw` {series (glob), from_ms, to_ms}: seal the local rings' samples of that time
  range as raw batches (at most 8 series blocks each).
* `rebirth`: publish the retained `state` and `meta` again on the live connection.

The uplink receives every `cmd/{name}` message and hands (name, payload) to the
`Dispatcher`, which refuses oversized payloads and unknown names, has the router's gate
admit the request (operator signature, docs/twin.md), calls the handler the router holds,
has the gate seal the reply (signed by the gateway), and turns a `CommandError` (or any failure) into the JSON error reply
`{"ok": false, "error": {"code", "message"}}`. The uplink publishes whatever bytes come back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from edgerund.errors import CommandError
from edgerund.telemetry.batcher import Batcher, Sealed, UnknownSeries

if TYPE_CHECKING:
    from edgerund.ports import Admitted, CommandRouter
    from edgerund.remote import RemoteCommands
    from edgerund.telemetry.spool import Spool
    from edgerund.telemetry.uplink import Uplink

log = structlog.get_logger("edgerund.telemetry.commands")

MAX_RESEND_BATCHES = 1_000_000


def json_obj(payload: bytes) -> dict[str, Any]:
    """The request as a JSON object (an empty payload is `{}`)."""
    if not payload.strip():
        return {}
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(
            "bad_json", f"expected a JSON object, got invalid JSON ({exc})"
        ) from None
    if not isinstance(obj, dict):
        raise CommandError("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def int_arg(obj: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CommandError("bad_args", f"{key}: expected an integer {lo}..{hi}, got {v!r}")
    return v


class TelemetryCommands:
    """Handlers of `resend`, `upload_raw` and `rebirth` (see the module docstring)."""

    def __init__(
        self,
        *,
        spool: Spool,
        batcher: Batcher,
        write: Callable[[Sealed], object],
        uplink: Callable[[], Uplink | None],
        schema_ver: Callable[[], int],
    ) -> None:
        self._spool = spool
        self._batcher = batcher
        self._write = write
        self._uplink = uplink
        self._schema_ver = schema_ver

    def register(self, router: CommandRouter) -> None:
        router.register("resend", self.resend)
        router.register("upload_raw", self.upload_raw)
        router.register("rebirth", self.rebirth)

    async def resend(self, payload: bytes) -> bytes:
        obj = json_obj(payload)
        epoch = int_arg(obj, "epoch")
        first = int_arg(obj, "from_seq", 1)
        last = int_arg(obj, "to_seq", first)
        if last - first > MAX_RESEND_BATCHES:
            raise CommandError(
                "bad_args",
                f"range too large: expected <= {MAX_RESEND_BATCHES} batches, "
                f"got {last - first + 1}",
            )
        if epoch != self._spool.epoch:
            raise CommandError(
                "wrong_epoch", f"expected the current spool epoch {self._spool.epoch}, got {epoch}"
            )
        requeued, missing = await asyncio.wrap_future(self._spool.requeue(epoch, first, last))
        up = self._uplink()
        if up is not None:
            up.reset_cursors()
        return json.dumps(
            {"ok": True, "id": obj.get("id"), "requeued": len(requeued), "missing": missing}
        ).encode()

    async def upload_raw(self, payload: bytes) -> bytes:
        obj = json_obj(payload)
        pattern = obj.get("series", "*")
        if not isinstance(pattern, str) or not pattern or len(pattern) > 200:
            raise CommandError("bad_args", f"series: expected a glob string, got {pattern!r}")
        t_from = int_arg(obj, "from_ms")
        t_to = int_arg(obj, "to_ms", t_from)
        try:
            batches, n = self._batcher.upload_raw(pattern, t_from, t_to)
        except UnknownSeries as exc:
            raise CommandError("unknown_series", str(exc)) from None
        for sealed in batches:
            self._write(sealed)
        return json.dumps(
            {"ok": True, "id": obj.get("id"), "batches": len(batches), "samples": n}
        ).encode()

    async def rebirth(self, payload: bytes) -> bytes:
        obj = json_obj(payload)
        up = self._uplink()
        if up is not None:
            await up.republish()
        return json.dumps(
            {"ok": True, "id": obj.get("id"), "schema_ver": self._schema_ver()}
        ).encode()


class Dispatcher:
    """Runs one `cmd/{name}` request through the router; returns the reply payload."""

    def __init__(self, router: RemoteCommands, *, max_bytes: int) -> None:
        self._router = router
        self.max_bytes = max_bytes
        self.handled = 0
        self.rejected = 0
        self._logged_rejects: set[str] = set()

    async def __call__(self, name: str, payload: bytes) -> bytes | None:
        admitted: Admitted | None = None
        try:
            if len(payload) > self.max_bytes:
                raise CommandError(
                    "too_large", f"expected <= {self.max_bytes} bytes, got {len(payload)}"
                )
            handler = self._router.handler(name)
            if handler is None:
                raise CommandError(
                    "unknown_command", f"expected one of {self._router.names()}, got {name!r}"
                )
            admitted = self._router.gate.admit(name, payload)
            reply = await handler(admitted.payload)
            self.handled += 1
            if reply is None:
                return None
            return await self._router.gate.seal(name, admitted, reply)
        except CommandError as exc:
            self.rejected += 1
            key = f"{name}:{exc.code}"
            if key not in self._logged_rejects:  # log each kind once, count all
                self._logged_rejects.add(key)
                log.warning("telemetry_cmd_rejected", cmd=name, code=exc.code, error=exc.message)
            err = json.dumps(
                {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            ).encode()
            if admitted is not None:  # an authenticated request gets a signed refusal
                return await self._router.gate.seal(name, admitted, err)
            return err
        except Exception as exc:
            self.rejected += 1
            log.error("telemetry_cmd_failed", cmd=name, error=repr(exc))
            return json.dumps(
                {
                    "ok": False,
                    "error": {"code": "failed", "message": f"{type(exc).__name__}: {exc}"},
                }
            ).encode()
