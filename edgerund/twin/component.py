"""The `twin` component: signed remote operations and the reported state (docs/twin.md).

Theory of operation
-------------------
Commands. The root makes one `gate.CommandGate` and installs it on the `RemoteCommands`
router, so every `cmd/{name}` request telemetry receives is authenticated (operator
signature, replay window) before a handler runs and every authenticated reply is signed by
the gateway. This component registers the twin's own commands with the router:

* `status` {}: the daemon's whole status (what `edgerunctl status --json` shows);
* `attest` {nonce: hex}: a fresh TPM quote for the verifier's nonce (DESIGN.md
  "Attestation result"), i.e. remote attestation without site access;
* `reload` {}: re-read the config file (as SIGHUP); the reply names what needs a restart;
* `support-bundle` {} then {bundle_id, chunk}: the support bundle in chunks (bundle.py).

Desired state. On the same session the component subscribes to the retained
`.../desired` topic and hands each document to `applier.DesiredApplier` (one at a time),
which offers its model targets to `modeltargets.ModelTargets` (bundles pulled from the
broker on a session of their own and installed through the updates component's job queue);
its outcome and the origin of every key are in the reported state, and the diagnostics
command `config` (`edgerunctl config`) shows the effective config with the origin of each
key (file, or twin version N).

Reported state. When the uplink (the broker) is configured, a task keeps its own MQTT 5
session (`edgerund-{gateway}-twin`, so the telemetry drain is never held up by a twin
publish) and publishes the retained, signed reported document (`reported.build`) on every
connect, whenever its material part changes (checked every `check_interval_s`) and at
least every `heartbeat_s`. The will message is empty-free: the birth/death `state` is the
telemetry uplink's; the reported document stays retained across broker restarts (the
broker persists retained messages) and is refreshed on reconnect.

The root hands the component typed callables (its status, its reload, the config origin
table): no lookup of peers by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import msgspec
import structlog

from edgerund import logs
from edgerund.component import Command
from edgerund.errors import CommandError, EdgerundError
from edgerund.telemetry.commands import json_obj
from edgerund.telemetry.config import broker_credentials
from edgerund.twin import bundle, reported
from edgerund.twin.applier import DesiredApplier
from edgerund.twin.auth import reported_message
from edgerund.twin.bundle import BundleStore
from edgerund.twin.fetch import connect_properties
from edgerund.twin.gate import CommandGate, gateway_sign
from edgerund.twin.modeltargets import ModelTargets

if TYPE_CHECKING:
    import ssl

    import aiomqtt
    from paho.mqtt.properties import Properties

    from edgerund.component import Peer
    from edgerund.config.schema import Config
    from edgerund.context import TaskScope
    from edgerund.ports import CommandRouter, IdentityPort
    from edgerund.twin.modeltargets import Installer
    from edgerund.twin.pins import Pins

log = structlog.get_logger("edgerund.twin")

EMPTY_STATUS: dict[str, object] = {"twin": {"enabled": False}}

StatusFn = Callable[[], Mapping[str, Any]]
ReloadFn = Callable[[], Awaitable[tuple[bool, str]]]


def reported_topic(cfg: Config) -> str:
    return f"{cfg.twin.topic_prefix}/{cfg.gateway.site}/{cfg.gateway.id}/reported"


def desired_topic(cfg: Config) -> str:
    return f"{cfg.twin.topic_prefix}/{cfg.gateway.site}/{cfg.gateway.id}/desired"


MAX_DESIRED_BYTES = 256 * 1024


class TwinComponent:
    name = "twin"

    def __init__(
        self,
        cfg: Config,
        *,
        gate: CommandGate,
        router: CommandRouter,
        identity: IdentityPort | None,
        status: StatusFn,
        reload: ReloadFn,
        config_digest: Callable[[], str],
        restart_needed: Callable[[], list[str]],
        applier: DesiredApplier,
        current: Callable[[], Config],
        scope: TaskScope,
        updates: Installer | None = None,
        pins: Pins | None = None,
    ) -> None:
        self.cfg = cfg
        self.gate = gate
        self._identity = identity
        self._status = status
        self._reload = reload
        self._digest = config_digest
        self._restart_needed = restart_needed
        self._scope = scope
        self.applier = applier
        self._current = current
        applier._notify = self.notify
        self.seq = 0
        self.published = 0
        self.connected = False
        self.last_bytes = 0
        self.sign_errors = 0
        self._signing_failed = False
        self._last_material: str | None = None
        self._kick = asyncio.Event()
        router.register("status", self.cmd_status)
        router.register("attest", self.cmd_attest)
        router.register("reload", self.cmd_reload)
        router.register("support-bundle", self.cmd_support_bundle)
        self._bundles = BundleStore()
        self.targets = ModelTargets(
            cfg,
            installer=updates,
            managed=(lambda: updates.records) if updates is not None else dict,
            scope=scope,
            notify=self.notify,
            client=self._bundle_client,
            pins=pins,
        )
        applier.models = self.targets.offer

    # -- remote commands (admitted by the gate: operator-signed) --------------------------
    async def cmd_status(self, payload: bytes) -> bytes:
        obj = json_obj(payload)
        return json.dumps({"ok": True, "id": obj.get("id"), "status": self._status()}).encode()

    async def cmd_attest(self, payload: bytes) -> bytes:
        obj = json_obj(payload)
        nonce = obj.get("nonce")
        try:
            if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
                raise ValueError
            raw = bytes.fromhex(nonce)
        except ValueError:
            raise CommandError(
                "bad_args", f"nonce: expected 8..64 bytes as hex, got {nonce!r}"
            ) from None
        if self._identity is None:
            raise CommandError("no_identity", "the identity is not running")
        quote = await self._identity.attest(raw)
        return json.dumps({"ok": True, "id": obj.get("id"), "attestation": quote}).encode()

    async def cmd_reload(self, payload: bytes) -> bytes:
        obj = json_obj(payload)
        ok, message = await self._reload()
        if not ok:
            raise CommandError("config_invalid", message)
        self._kick.set()
        return json.dumps({"ok": True, "id": obj.get("id"), "message": message}).encode()

    async def cmd_support_bundle(self, payload: bytes) -> bytes:
        obj = json_obj(payload)
        if "bundle_id" in obj:
            out = self._bundles.chunk(obj.get("bundle_id"), obj.get("chunk"))
        else:
            status = dict(self._status())
            config = msgspec.to_builtins(self._current())
            data = await asyncio.to_thread(bundle.build, status, logs.RING.tail(2000), config)
            out = self._bundles.put(data)
        return json.dumps({"ok": True, "id": obj.get("id"), **out}).encode()

    # -- reported state -------------------------------------------------------------------
    def document(self) -> dict[str, Any]:
        self.seq += 1
        return reported.build(
            self._status(),
            seq=self.seq,
            ts_ms=int(time.time() * 1000),
            config_digest=self._digest(),
            origin=self.applier.origin(),
            desired={**self.applier.outcome, "models": self.targets.report()},
            restart_needed=self._restart_needed(),
            commands=self.gate.status(),
            overrides=self.targets.active_overrides(),
        )

    async def signed_document(self) -> bytes:
        signed = self.document()
        out: dict[str, Any] = {"signed": signed}
        if self._identity is not None:
            out.update(await gateway_sign(self._identity, reported_message(signed)))
        data = json.dumps(out, separators=(",", ":"), default=str).encode()
        self._last_material = json.dumps(reported.material(signed), sort_keys=True, default=str)
        return data

    async def _signed_or_none(self) -> bytes | None:
        """The signed document, or None while the identity key cannot sign (TPM reset,
        simulator gone): an unsigned reported state would be refused by the backend, so
        the publish waits for the next check and the previous retained document stays."""
        try:
            data = await self.signed_document()
        except EdgerundError as exc:
            self.sign_errors += 1
            if not self._signing_failed:  # log the state change, not every retry
                self._signing_failed = True
                log.warning("twin_reported_sign_failed", error=str(exc), action="retrying")
            return None
        if self._signing_failed:
            self._signing_failed = False
            log.info("twin_reported_sign_recovered", failures=self.sign_errors)
        return data

    def changed(self) -> bool:
        doc = reported.material(self.document())
        self.seq -= 1  # a comparison is not a publish
        return json.dumps(doc, sort_keys=True, default=str) != self._last_material

    def notify(self) -> None:
        """Publish the reported state soon (a desired version applied, a reload)."""
        self._kick.set()

    def _credentials(self) -> tuple[str | None, ssl.SSLContext | None]:
        return broker_credentials(self.cfg.uplink)  # blocking: reads files

    async def _bundle_client(self) -> aiomqtt.Client:
        """A session of its own for bundle fetches (twin/fetch.py): the same broker
        settings, so a long transfer never holds up the reported state."""
        creds = await asyncio.to_thread(self._credentials)
        props = connect_properties(self.cfg.updates.mqtt_chunk_max_kb * 1024)
        return self._client(creds, f"edgerund-{self.cfg.gateway.id}-bundles", props)

    def _client(
        self,
        creds: tuple[str | None, ssl.SSLContext | None],
        identifier: str | None = None,
        properties: Properties | None = None,
    ) -> aiomqtt.Client:
        import aiomqtt  # loaded off the loop by __aenter__

        u = self.cfg.uplink
        password, tls = creds
        return aiomqtt.Client(
            u.host,
            u.port,
            identifier=identifier or f"edgerund-{self.cfg.gateway.id}-twin",
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=u.keepalive_s,
            timeout=u.connect_timeout_s,
            tls_context=tls,
            username=u.username,
            password=password,
            properties=properties,
        )

    async def _publisher(self) -> None:
        import aiomqtt  # loaded off the loop by __aenter__

        backoff = self.cfg.uplink.backoff_initial_s
        topic = reported_topic(self.cfg)
        while True:
            try:
                client = self._client(await asyncio.to_thread(self._credentials))
                async with client:
                    await client.subscribe(desired_topic(self.cfg), qos=1)
                    self._scope.spawn(
                        "desired", functools.partial(self._desired, client), restart=False
                    )
                    self.connected = True
                    backoff = self.cfg.uplink.backoff_initial_s
                    last = 0.0
                    while True:
                        now = time.monotonic()
                        if (
                            self._kick.is_set()
                            or now - last >= self.cfg.twin.heartbeat_s
                            or self.changed()
                        ):
                            self._kick.clear()
                            data = await self._signed_or_none()
                            if data is not None:
                                await client.publish(topic, data, qos=1, retain=True)
                                self.published += 1
                                self.last_bytes = len(data)
                            last = now
                        try:
                            async with asyncio.timeout(self.cfg.twin.check_interval_s):
                                await self._kick.wait()
                        except TimeoutError:
                            pass
            except aiomqtt.MqttError as exc:
                if self.connected:
                    log.warning("twin_disconnected", error=str(exc))
                self.connected = False
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self.cfg.uplink.backoff_max_s)

    async def _desired(self, client: aiomqtt.Client) -> None:
        """Desired documents of this session, applied one at a time (the applier locks)."""
        import aiomqtt  # loaded off the loop by __aenter__

        with contextlib.suppress(aiomqtt.MqttError):
            async for msg in client.messages:
                payload = msg.payload
                if not isinstance(payload, bytes | bytearray) or not payload:
                    continue  # an empty retained message clears the desired state: nothing to do
                if len(payload) > MAX_DESIRED_BYTES:
                    log.warning("twin_desired_too_large", bytes=len(payload))
                    continue
                try:
                    await self.applier.handle(bytes(payload))
                except Exception as exc:  # a bug here must not end the daemon: report it
                    log.exception("twin_desired_failed")
                    self.applier.failed(repr(exc))

    async def _cmd_config(self, args: dict[str, Any], peer: Peer) -> Any:
        origin = self.applier.origin()
        return {
            "config": msgspec.to_builtins(self._current()),
            "origin": origin,
            "default_origin": "file",
            "desired": self.applier.outcome,
        }

    # -- component ------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.targets.load()
        if self.cfg.uplink.enabled:
            # aiomqtt (with paho, ssl's users, email, urllib) is imported only here, in a
            # thread: a daemon without an uplink never loads it, and the event loop never
            # waits ~40 ms for the import (README "Start-up").
            await asyncio.to_thread(importlib.import_module, "aiomqtt")
            self._scope.spawn("reported", self._publisher)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def status(self) -> dict[str, object]:
        return {
            "twin": {
                "enabled": True,
                "connected": self.connected,
                "reported_published": self.published,
                "reported_bytes": self.last_bytes,
                "reported_sign_errors": self.sign_errors,
                "commands": self.gate.status(),
                "desired": self.applier.outcome,
                "desired_refused": self.applier.refused,
                "model_targets": self.targets.report(),
            }
        }

    def commands(self) -> Mapping[str, Command]:
        return {
            "config": Command(
                self._cmd_config,
                help="effective config with the origin of each key (file or twin version N)",
            )
        }
