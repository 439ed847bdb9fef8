"""The reference consumer under poisoned input (issue #12 item 10).

Each test feeds what an attacker who can publish on the broker would send; each fails on
the consumer before the defence: a KeyError, a RecursionError or ValueError escaping the
decoder's error type, a walk over 2**50 sequence numbers, seconds of CPU for a 299-byte
zstd payload decoded before its signature was checked, or a relabelling `meta` accepted.
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgerund.backend.consumer import Consumer, RangeSet
from edgerund.telemetry import codec
from edgerund.telemetry.codec import Batch, Cls, EventBlock, SeriesBlock

T = "tlm/v1/site/gw1"


def _signer() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, codec.key_id_for(spki)


def _sign(payload: bytes, key: ec.EllipticCurvePrivateKey, key_id: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    der = key.sign(codec.signing_digest(payload), ec.ECDSA(Prehashed(hashes.SHA256())))
    sig = codec.Signature(codec.SIG_ALG_ECDSA_P256_SHA256, key_id, codec.der_to_rs(der))
    return codec.attach_signature(payload, sig)


def _sign_meta(doc: dict[str, object], key: ec.EllipticCurvePrivateKey, key_id: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    der = key.sign(codec.meta_signing_digest(doc), ec.ECDSA(Prehashed(hashes.SHA256())))
    return json.dumps(codec.with_meta_signature(doc, key_id, codec.der_to_rs(der))).encode()


def _batch(seq: int, *, epoch: int = 1) -> bytes:
    blk = SeriesBlock(1, np.array([1000, 2000], dtype=np.int64), (np.array([5, 6]),), (-1,))
    return codec.encode(Batch(Cls.EVT, epoch, seq, 1, (blk,)))


def _event_payload(fields_json: str) -> bytes:
    """A well-framed batch whose event block carries `fields_json` verbatim."""
    raw = bytearray()
    codec.put_uvarint(raw, 1000)
    codec.put_str(raw, "k")
    codec.put_str(raw, "s")
    codec.put_str(raw, fields_json)
    body = bytearray()
    codec.put_uvarint(body, 1)
    body.append(codec.BLOCK_EVENT)
    codec.put_uvarint(body, len(raw))
    body += raw
    out = bytearray([codec.VERSION, 0])
    for v in (1, 1, 1, len(body)):
        codec.put_uvarint(out, v)
    return bytes(out + body)


def test_retained_meta_without_id_is_invalid_not_a_crash() -> None:
    c = Consumer()
    meta = {"schema_ver": 1, "series": [{"name": "x"}]}
    for _ in range(3):  # every reconnect re-delivers the retained message
        (rec,) = c.handle(f"{T}/meta", json.dumps(meta).encode())
        assert rec["type"] == "invalid" and "series[0]" in rec["error"]
    assert c.metas == {}


def test_deep_json_and_huge_numbers_in_event_fields_are_decode_errors() -> None:
    c = Consumer()
    deep = "[" * 20_000 + "]" * 20_000
    huge = '{"n": ' + "9" * 5000 + "}"
    for text in (deep, huge, '{"a": ' * 40 + "1" + "}" * 40):
        (rec,) = c.handle(f"{T}/evt", _event_payload(text))
        assert rec["type"] == "invalid", rec
        assert "event fields" in rec["error"]
    assert c.counts["invalid"] == 3
    (ok,) = c.handle(f"{T}/evt", _event_payload('{"a": {"b": [1, 2]}}'))
    assert ok["type"] == "event" and ok["fields"] == {"a": {"b": [1, 2]}}


def test_deep_json_in_meta_and_state_is_refused() -> None:
    c = Consumer()
    for kind in ("meta", "state"):
        (rec,) = c.handle(f"{T}/{kind}", b"[" * 50_000)
        assert rec["type"] == "invalid" and "nested deeper" in rec["error"]


def test_gap_tracking_is_by_ranges() -> None:
    c = Consumer()
    t0 = time.process_time()
    c.handle(f"{T}/evt", _batch(1))
    c.handle(f"{T}/evt", _batch(1 << 50))
    gaps = c.gaps()
    assert time.process_time() - t0 < 1.0
    assert gaps == [
        {"type": "gap", "gateway": "gw1", "epoch": 1, "from_seq": 2, "to_seq": (1 << 50) - 1}
    ]


def test_rangeset_merges_and_matches_a_plain_set() -> None:
    rs = RangeSet()
    ref: set[int] = set()
    rng = np.random.default_rng(7)
    for x in rng.integers(0, 200, 400):
        rs.add(int(x))
        ref.add(int(x))
    assert all((i in rs) == (i in ref) for i in range(-5, 210))
    runs = rs.ranges()
    assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(runs))


def _zstd_bomb() -> bytes:
    """A 1-block series batch whose tiny zstd body expands to megabytes of varints."""
    n = 4_000_000
    blk = bytearray()
    codec.put_uvarint(blk, 1)  # series id
    codec.put_uvarint(blk, n)
    blk += b"\x00" * 16  # garbage: never reached when the cap holds
    body = bytearray()
    codec.put_uvarint(body, 1)
    body.append(codec.BLOCK_SERIES)
    codec.put_uvarint(body, n)
    body += b"\x00" * n
    z = zstandard.ZstdCompressor(level=19).compress(bytes(body))
    out = bytearray([codec.VERSION, codec.FLAG_ZSTD])
    for v in (1, 7, 1, len(z)):
        codec.put_uvarint(out, v)
    return bytes(out + z)


def test_small_zstd_bomb_is_refused_cheaply() -> None:
    bomb = _zstd_bomb()
    assert len(bomb) < 1000
    c = Consumer()
    t0 = time.process_time()
    (rec,) = c.handle(f"{T}/evt", bomb)
    assert time.process_time() - t0 < 0.5
    assert rec["type"] == "invalid" and "expand at most" in rec["error"]


def test_signature_is_checked_before_the_body_is_decompressed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, kid = _signer()
    c = Consumer(public_keys=[key.public_key()], require_signature=True)
    calls = []
    real = codec.decode_framed

    def spy(f: codec.Framed, **kw: int) -> codec.Decoded:
        calls.append(f.seq)
        return real(f, **kw)

    monkeypatch.setattr(codec, "decode_framed", spy)
    other, other_id = _signer()
    forged = _sign(_zstd_bomb(), other, kid)  # claims our key id, signed by another
    unsigned = _zstd_bomb()
    for p in (forged, unsigned, _sign(_zstd_bomb(), other, other_id)):
        (rec,) = c.handle(f"{T}/evt", p)
        assert rec["type"] == "invalid"
    assert calls == []  # nothing unauthenticated reached the body decoder
    (good,) = c.handle(f"{T}/evt", _sign(_batch(3), key, kid))
    assert good["type"] == "series" and good["verified"] is True
    assert calls == [3]


def test_meta_is_signed_and_an_unsigned_relabel_is_refused() -> None:
    key, kid = _signer()
    c = Consumer(public_keys=[key.public_key()], require_signature=True)
    meta = {"schema_ver": 1, "series": [{"id": 1, "name": "boiler.temp", "unit": "degC"}]}
    (ok,) = c.handle(f"{T}/meta", _sign_meta(meta, key, kid))
    assert ok["type"] == "meta" and ok["verified"] is True
    relabel = {"schema_ver": 1, "series": [{"id": 1, "name": "boiler.pressure", "unit": "bar"}]}
    (bad,) = c.handle(f"{T}/meta", json.dumps(relabel).encode())
    assert bad["type"] == "invalid" and "unsigned" in bad["error"]
    tampered = json.loads(_sign_meta(meta, key, kid))
    tampered["series"][0]["name"] = "boiler.pressure"
    (bad2,) = c.handle(f"{T}/meta", json.dumps(tampered).encode())
    assert bad2["type"] == "invalid" and "does not verify" in bad2["error"]
    (rec,) = c.handle(f"{T}/evt", _sign(_batch(1), key, kid))
    assert rec["name"] == "boiler.temp"


def test_encoder_never_produces_what_the_decoder_caps() -> None:
    """A genuine, extremely compressible batch is sent uncompressed rather than refused."""
    n = 200_000
    blk = SeriesBlock(
        1,
        np.arange(n, dtype=np.int64) * 10 + 1000,
        (np.zeros(n, dtype=np.int64),),
        (0,),
    )
    ev = EventBlock(5, "k", "s", {"x": "y" * 100_000})
    payload = codec.encode(Batch(Cls.RAW, 1, 1, 1, (blk, ev)))
    dec = codec.decode(payload)
    assert dec.batch.blocks[0].n == n  # type: ignore[union-attr]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    kind=st.sampled_from(["evt", "agg", "raw", "meta", "state", "x"]),
    payload=st.binary(max_size=300),
)
def test_handle_never_raises(kind: str, payload: bytes) -> None:
    recs = Consumer().handle(f"{T}/{kind}", payload)
    assert recs and all(isinstance(r, dict) and "type" in r for r in recs)
