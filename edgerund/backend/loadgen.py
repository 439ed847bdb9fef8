"""Synthetic gateways for consumer tests and benchmarks: signed v1 batches on real topics.

`SyntheticGateway` encodes batches the way a gateway's uplink does (codec v1, zstd, an
ECDSA P-256 signature trailer) with deterministic content: batch `seq` of a gateway holds
`samples` one-second samples starting at `t0_ms + (seq - 1) * samples * 1000`, so every
(gateway, series, channel, t) is unique across batches and a duplicate row in a database
can only come from a batch written twice. `publish` sends them at QoS 1 with a paho
client (MQTT 5) and waits for every PUBACK.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgerund.telemetry import codec

META = {
    "schema_ver": 1,
    "series": [
        {"id": 1, "name": "env.temp", "unit": "degC", "channels": ["value"]},
        {"id": 2, "name": "power.v", "unit": "V", "channels": ["value"]},
    ],
}


def new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@dataclass
class SyntheticGateway:
    gateway: str
    key: Any
    site: str = "plant-1"
    epoch: int = 29_467_000
    samples: int = 20
    t0_ms: int = field(default_factory=lambda: (int(time.time()) - 3600) * 1000)

    @property
    def topic(self) -> str:
        return f"tlm/v1/{self.site}/{self.gateway}"

    def batch(self, seq: int) -> bytes:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        n = self.samples
        t = self.t0_ms + (seq - 1) * n * 1000 + np.arange(n, dtype=np.int64) * 1000
        temp, _ = codec.quantize(20.0 + 0.01 * ((np.arange(n) + seq) % 97), -2)
        volt, _ = codec.quantize(12.0 + 0.001 * ((np.arange(n) * 7 + seq) % 31), -3)
        blocks: tuple[codec.Block, ...] = (
            codec.SeriesBlock(1, t, (temp,), (-2,)),
            codec.SeriesBlock(2, t, (volt,), (-3,)),
        )
        if seq % 10 == 0:
            blocks += (codec.EventBlock(int(t[-1]), "threshold", "env.temp", {"seq": seq}),)
        payload = codec.encode(codec.Batch(codec.Cls.RAW, self.epoch, seq, 1, blocks))
        spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        der = self.key.sign(codec.signing_digest(payload), ec.ECDSA(Prehashed(hashes.SHA256())))
        sig = codec.Signature(
            codec.SIG_ALG_ECDSA_P256_SHA256, codec.key_id_for(spki), codec.der_to_rs(der)
        )
        return codec.attach_signature(payload, sig)

    def rows_per_batch(self, seq: int) -> int:
        return 2 * self.samples + (1 if seq % 10 == 0 else 0)


def publish(
    host: str,
    port: int,
    items: list[tuple[str, bytes]],
    *,
    retained: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
    client_id: str = "",
    rate_per_s: float | None = None,
    timeout_s: float = 120.0,
) -> None:
    """Publish (topic, payload) pairs at QoS 1 and wait for every PUBACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=1, retain=True) for t, p in retained]
        start = time.monotonic()
        for i, (t, p) in enumerate(items):
            infos.append(c.publish(t, p, qos=1))
            if rate_per_s:
                ahead = start + i / rate_per_s - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError("a publish was not acknowledged in time")
    finally:
        c.disconnect()
        c.loop_stop()


def meta_bytes() -> bytes:
    return json.dumps(META).encode()
