"""Codec v1: exact round trips (hypothesis), strict decoding, signature trailer."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgerund.telemetry import codec
from edgerund.telemetry.codec import (
    Batch,
    Cls,
    DecodeError,
    EventBlock,
    LossBlock,
    LossReason,
    SeriesBlock,
)

LIM = (1 << 60) - 1
ints = st.integers(min_value=-LIM, max_value=LIM)
small = st.integers(min_value=-1000, max_value=1000)


@st.composite
def series(draw: st.DrawFn) -> SeriesBlock:
    n = draw(st.integers(1, 80))
    mode = draw(st.sampled_from(["periodic", "jitter", "random"]))
    t0 = draw(st.integers(0, 1 << 44))
    if mode == "random":
        t = np.array(
            draw(st.lists(st.integers(0, 1 << 50), min_size=n, max_size=n)), dtype=np.int64
        )
    else:
        period = draw(st.integers(1, 100_000))
        jit = (
            draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n))
            if mode == "jitter"
            else [0] * n
        )
        t = np.array([t0 + i * period + j + 5 for i, j in enumerate(jit)], dtype=np.int64)
    nch = draw(st.integers(1, 4))
    cols = []
    for _ in range(nch):
        kind = draw(st.sampled_from(["walk", "wide", "const"]))
        if kind == "walk":
            start = draw(st.integers(-(1 << 40), 1 << 40))
            steps = draw(st.lists(small, min_size=n, max_size=n))
            cols.append(np.array(np.cumsum([start, *steps[1:]]), dtype=np.int64))
        elif kind == "wide":
            cols.append(np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=np.int64))
        else:
            cols.append(np.full(n, draw(ints), dtype=np.int64))
    scales = tuple(draw(st.integers(-12, 12)) for _ in range(nch))
    return SeriesBlock(draw(st.integers(0, (1 << 32) - 1)), t, tuple(cols), scales)


text = st.text(max_size=40)
events = st.builds(
    EventBlock,
    st.integers(0, 1 << 50),
    text,
    text,
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.integers(-(1 << 50), 1 << 50), text, st.booleans(), st.none()),
        max_size=4,
    ),
)
losses = st.builds(
    LossBlock,
    st.sampled_from(list(LossReason)),
    st.sampled_from(list(Cls)),
    st.integers(0, 1 << 44),
    st.integers(0, 1 << 44),
    st.integers(0, 1 << 40),
    st.lists(st.integers(1, 1 << 40), unique=True, max_size=20).map(lambda x: tuple(sorted(x))),
    st.lists(st.integers(0, 1 << 32 - 1), max_size=5).map(tuple),
)


def _same(a: codec.Block, b: codec.Block) -> None:
    assert type(a) is type(b)
    if isinstance(a, SeriesBlock):
        assert isinstance(b, SeriesBlock)
        assert a.series_id == b.series_id and a.scale_exp == b.scale_exp
        assert np.array_equal(a.t_ms, b.t_ms)
        for x, y in zip(a.values, b.values, strict=True):
            assert np.array_equal(x, y)
    elif isinstance(a, LossBlock):
        assert isinstance(b, LossBlock)
        assert (a.reason, a.cls, a.t_first_ms, a.n_samples, a.seqs, a.series_ids) == (
            b.reason,
            b.cls,
            b.t_first_ms,
            b.n_samples,
            b.seqs,
            b.series_ids,
        )
        assert b.t_last_ms == max(a.t_last_ms, a.t_first_ms)
    else:
        assert a == b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(series(), events, losses), max_size=5),
    st.sampled_from(list(Cls)),
    st.integers(0, 1 << 40),
    st.integers(0, 1 << 40),
    st.integers(0, (1 << 32) - 1),
    st.booleans(),
)
def test_round_trip_is_exact(
    blocks: list[codec.Block], cls: Cls, epoch: int, seq: int, ver: int, z: bool
) -> None:
    payload = codec.encode(Batch(cls, epoch, seq, ver, tuple(blocks)), compress=z)
    d = codec.decode(payload)
    assert (d.batch.cls, d.batch.epoch, d.batch.seq, d.batch.schema_ver) == (cls, epoch, seq, ver)
    assert d.signature is None
    assert len(d.batch.blocks) == len(blocks)
    for a, b in zip(blocks, d.batch.blocks, strict=True):
        _same(a, b)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_gives_decode_error_only(data: bytes) -> None:
    try:
        codec.decode(data)
    except DecodeError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(series(), st.data())
def test_truncation_and_corruption_are_caught(block: SeriesBlock, data: st.DataObject) -> None:
    payload = codec.encode(Batch(Cls.RAW, 7, 9, 1, (block,)))
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(DecodeError):
        codec.decode(payload[:cut])
    with pytest.raises(DecodeError, match="unexpected bytes"):
        codec.decode(payload + b"\x00")
    i = data.draw(st.integers(0, len(payload) - 1))
    flipped = bytearray(payload)
    flipped[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        codec.decode(bytes(flipped))
    except DecodeError:
        pass


def test_scaled_values_round_trip_exactly_as_decimals() -> None:
    vals = np.array([21.53, 21.54, -0.01, 0.0, 1234.56, 21.53])
    ints, ok = codec.quantize(vals, -2)
    assert ok.all()
    assert list(ints) == [2153, 2154, -1, 0, 123456, 2153]
    assert list(codec.dequantize(ints, -2)) == list(vals)
    _, ok = codec.quantize(np.array([np.nan, np.inf, 1e30]), -2)
    assert not ok.any()


def test_errors_say_what_and_where() -> None:
    t = np.arange(10, dtype=np.int64) * 1000 + 1_700_000_000_000
    good = codec.encode(Batch(Cls.AGG, 1, 2, 3, (SeriesBlock(1, t, (t % 7,), (0,)),)))
    with pytest.raises(DecodeError, match=r"byte 0: unsupported version 2 \(expected 1\)"):
        codec.decode(b"\x02" + good[1:])
    with pytest.raises(DecodeError, match="reserved flag bits"):
        codec.decode(good[:1] + bytes([good[1] | 0x80]) + good[2:])
    with pytest.raises(DecodeError, match="truncated"):
        codec.decode(good[:5])
    with pytest.raises(DecodeError, match="expected bytes"):
        codec.decode("text")  # type: ignore[arg-type]


def test_zstd_bomb_refused() -> None:
    import zstandard

    body = zstandard.ZstdCompressor().compress(b"\x00" * (2 * 1024 * 1024))
    out = bytearray([1, codec.FLAG_ZSTD])
    for v in (1, 1, 1, len(body)):
        codec.put_uvarint(out, v)
    with pytest.raises(DecodeError, match="content size"):
        codec.decode(bytes(out) + body, max_body=1024 * 1024)


def test_signature_trailer_verifies_and_detects_tampering() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import serialization

    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ev = EventBlock(1_700_000_000_000, "anomaly.start", "loop1", {"score": 0.9})
    payload = codec.encode(Batch(Cls.EVT, 5, 6, 1, (ev,)))
    der = key.sign(codec.signing_digest(payload), ec.ECDSA(Prehashed(hashes.SHA256())))
    signed = codec.attach_signature(
        payload, codec.Signature(1, codec.key_id_for(spki), codec.der_to_rs(der))
    )
    assert len(signed) == len(payload) + codec.TRAILER_LEN
    d = codec.decode(signed)
    assert d.signature is not None and d.signature.key_id == codec.key_id_for(spki)
    assert codec.verify(d, key.public_key())
    assert hashlib.sha256(d.signed_bytes).digest() == codec.signing_digest(payload)
    tampered = bytearray(signed)
    tampered[-70] ^= 0x01  # inside the event body, before the trailer
    try:
        dt = codec.decode(bytes(tampered))
    except DecodeError:
        return
    assert not codec.verify(dt, key.public_key())
    other = ec.generate_private_key(ec.SECP256R1())
    assert not codec.verify(d, other.public_key())


def test_jittered_periodic_series_is_compact() -> None:
    rng = np.random.default_rng(3)
    n = 600
    t = 1_700_000_000_000 + np.arange(n) * 100 + rng.integers(-3, 4, n)
    v = np.cumsum(rng.integers(-2, 3, n)) + 12000
    p = codec.encode(Batch(Cls.RAW, 29_000_000, 1000, 1, (SeriesBlock(1, t, (v,), (-3,)),)))
    assert len(p) / n < 1.5, len(p) / n
    d = codec.decode(p).batch.blocks[0]
    assert isinstance(d, SeriesBlock) and d.period_ms == 100
