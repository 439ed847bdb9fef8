"""The command gate: every remote `cmd/{name}` request is authenticated here before its
handler runs, and every authenticated reply is signed by the gateway (ports.CommandGate).

Policy (docs/twin.md §3). A command runs only when signed by an operator key of the
verified keyring (`auth.open_command`: domain-separated canonical form, this gateway's id,
the command name, a nonce and a timestamp inside the replay window), except:

* `rebirth`: it republishes the retained `state` and `meta`, which any subscriber of the
  gateway's topics already holds: it reveals nothing and changes nothing;
* `update`: the chunked bundle transfer carries its own end-to-end authentication (the
  publisher-signed manifest, checked against the same keyring with the anti-rollback
  counter before anything is installed), so a broker account can only deliver what a
  publisher signed, as the inbox directory can.

Everything else (`resend`, `upload_raw`, `status`, `attest`, `reload`, `rollback`, and any
command a component registers later) needs an operator signature: a stolen broker password
alone cannot make a gateway resend its history, reveal its status, roll a model back or
burn TPM time on quotes.

A refused request is counted by reason and answered with a plain (unsigned) error, since
signing every refusal would let anyone on the broker spend the gateway's TPM; the refusal
never ends the connection (the dispatcher answers and returns). An admitted request's
reply, success or error, is wrapped as

    {"signed": {"type": "edgerund-reply", "gateway", "cmd", "nonce", "ts", "reply": {...}},
     "key_id": hex, "sig": base64 DER ECDSA over SHA-256(reply domain + canonical(signed))}

and signed by the identity `Signer` (the telemetry key), off the loop where the TPM is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from edgerund.errors import CommandError, TrustError
from edgerund.ports import Admitted
from edgerund.twin.auth import ReplayGuard, open_command, reply_message
from edgerund.twin.nonces import NonceCache

if TYPE_CHECKING:
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgerund.config.schema import Config
    from edgerund.ports import Signer
    from edgerund.updates.keyring import Keyring

log = structlog.get_logger("edgerund.twin.gate")

UNSIGNED_COMMANDS = frozenset({"rebirth", "update"})
REPLY_TYPE = "edgerund-reply"


def key_id_hex(signer: Signer) -> str:
    kid: object = signer.key_id
    return kid.hex() if isinstance(kid, bytes | bytearray) else str(kid)


async def gateway_sign(signer: Signer, message: bytes) -> dict[str, str]:
    """`key_id` and base64 `sig` (DER ECDSA over SHA-256(message)) by the identity key."""
    der = await signer.sign_digest(hashlib.sha256(message).digest())
    return {"key_id": key_id_hex(signer), "sig": base64.b64encode(der).decode()}


class CommandGate:
    def __init__(
        self,
        *,
        gateway: str,
        keyring: Callable[[], Keyring | None],
        signer: Signer | None,
        window_s: float = 300.0,
        unsigned: frozenset[str] = UNSIGNED_COMMANDS,
        clock: Callable[[], float] = time.time,
        nonce_file: Path | None = None,
    ) -> None:
        self.gateway = gateway
        self._keyring = keyring
        self._signer = signer
        self._clock = clock
        self.unsigned = unsigned
        self.guard = ReplayGuard(window_s)
        # Persisted so a restart does not reopen the replay window (twin/nonces.py); the
        # root loads it before any command is dispatched and runs its writer task.
        self.nonces = None if nonce_file is None else NonceCache(self.guard, nonce_file)
        self.admitted = 0
        self.refused: Counter[str] = Counter()

    def _keys(self) -> tuple[Mapping[str, Ed25519PublicKey], Mapping[str, Ed25519PublicKey]]:
        kr = self._keyring()
        if kr is None:
            return {}, {}
        return kr.operators, kr.keys

    def admit(self, name: str, payload: bytes) -> Admitted:
        if name in self.unsigned:
            self.admitted += 1
            return Admitted(payload)
        operators, publishers = self._keys()
        try:
            if not operators:
                raise TrustError(
                    "no_operator_keys",
                    "the verified keyring lists no operator key: signed commands are refused",
                )
            op, args = open_command(
                payload,
                name=name,
                gateway=self.gateway,
                operators=operators,
                publishers=publishers,
                guard=self.guard,
                now_ms=int(self._clock() * 1000),
            )
        except TrustError as exc:
            self.refused[exc.code] += 1
            raise CommandError(exc.code, str(exc).split(": ", 1)[-1]) from None
        self.admitted += 1
        if self.nonces is not None:
            self.nonces.admitted()
        return Admitted(json.dumps(args).encode(), nonce=str(op.signed["nonce"]), keyid=op.keyid)

    async def seal(self, name: str, admitted: Admitted, reply: bytes) -> bytes:
        if admitted.nonce is None or self._signer is None:
            return reply
        try:
            body: Any = json.loads(reply)
        except ValueError:
            body = {"raw": base64.b64encode(reply).decode()}
        signed = {
            "type": REPLY_TYPE,
            "gateway": self.gateway,
            "cmd": name,
            "nonce": admitted.nonce,
            "ts": int(self._clock() * 1000),
            "reply": body,
        }
        sig = await gateway_sign(self._signer, reply_message(signed))
        return json.dumps({"signed": signed, **sig}, separators=(",", ":")).encode()

    def status(self) -> dict[str, object]:
        return {
            "admitted": self.admitted,
            "refused": sum(self.refused.values()),
            "refused_by_reason": dict(self.refused),
            "unsigned_allowed": sorted(self.unsigned),
            "nonce_write_errors": 0 if self.nonces is None else self.nonces.write_errors,
        }


def provisioned_keyring(cfg: Config) -> Keyring | None:
    """Without the updates component (no managed model), the operator keys come from the
    provisioned keyring file alone, if there is one and it is self-signed (blocking)."""
    from pathlib import Path

    from edgerund.updates.keyring import check_self_signed, parse_keyring

    path = Path(cfg.updates.keyring_file)
    if not path.is_absolute():
        path = Path(cfg.paths.state_dir) / path
    try:
        kr = parse_keyring(path.read_bytes())
        check_self_signed(kr)
    except (OSError, TrustError) as exc:
        log.info("twin_no_keyring", path=str(path), reason=str(exc))
        return None
    return kr
