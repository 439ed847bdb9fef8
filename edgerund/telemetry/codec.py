"""Telemetry wire format v1: batches of scaled-integer series, events and loss records.

Pure: arrays and records in, bytes out, and back; no I/O, no clock. docs/telemetry.md is
the normative description (byte tables); this docstring is the theory.

Why this shape (figures: `benchmarks/telemetry.py`): sensor values are decimals
quantised by the sensor, so they travel as integers `round(v * 10**-scale_exp)`; the round
trip of those integers is exact. Consecutive samples are close, so values are differenced
(order 0, 1 or 2) and timestamps are coded as residuals against an implicit periodic
schedule `t0 + i*period` (order 0: the scheduler's jitter, a few ms, costs ~3 bits) or,
for irregular series, as a delta-of-delta. Each integer column is then either zigzag
varints or frame-of-reference bit-packing in miniblocks of 32 (a width per miniblock, so a
load step widens one miniblock, not the batch). The encoder computes the exact size of
every (order, encoding) candidate and keeps the smallest, so the choice is per column and
adapts to the data; the decoder just follows the column's spec byte. The whole body then
goes through zstd when that makes it smaller (text-like records, repetitive series).

A batch carries the dedup key (spool epoch, batch seq) and the schema version (which
`meta` maps series ids to names, units and scales). The optional trailer is an ECDSA P-256
signature over SHA-256 of every byte before it (with the SIGNED flag already set), so the
backend can prove the batch came from the gateway's identity key.

`decode` accepts nothing it does not understand: truncation, trailing bytes, an unknown
version, block type or column spec, out-of-range integers, JSON nested deeper than
MAX_JSON_DEPTH, numbers Python refuses, a zstd bomb or a body that expands more than
MAX_ZSTD_RATIO all raise DecodeError saying what and where: it is the ONE error type of
every decoding failure. `unframe` splits header, body and trailer without decompressing or
parsing the body, so a backend checks the signature before it spends anything on the body.

The retained `meta` document is signed too (`meta_signing_digest` / `with_meta_signature`):
an ECDSA signature over SHA-256 of a domain tag and the canonical JSON of the document
without its `sig` member, so whoever can publish on the broker cannot relabel signed data.

One cohesive thing (the v1 wire format, both directions), hence one module of ~900 lines.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from edgerund.errors import EdgerundError
from edgerund.jsondepth import too_deep

VERSION = 1

FLAG_ZSTD = 0x01
FLAG_SIGNED = 0x02
CLS_SHIFT = 2
CLS_MASK = 0x0C
FLAG_RESERVED = 0xF0

BLOCK_SERIES = 1
BLOCK_EVENT = 2
BLOCK_LOSS = 3

ENC_VARINT = 0
ENC_FOR = 1
MINIBLOCK = 32  # base miniblock; a column may use 32 << m, m = 0..3

SIG_ALG_ECDSA_P256_SHA256 = 1
TRAILER_LEN = 1 + 4 + 64

MAX_ABS = 1 << 60  # scaled integers and timestamps must stay inside +-2**60
MAX_VALUES = 16_000_000  # per batch, decoder side: refuse memory bombs
MAX_BODY = 64 * 1024 * 1024
# A zstd body may expand at most this much (and always to ZSTD_FLOOR): a 299-byte frame that
# expands to megabytes of one-byte varints would otherwise cost seconds of CPU to decode.
# The encoder sends a body uncompressed rather than exceed it, so no genuine batch is refused.
MAX_ZSTD_RATIO = 32
ZSTD_FLOOR = 64 * 1024
MAX_JSON_DEPTH = 32  # event fields and meta documents: flat records, never deep trees
META_DOMAIN = b"edgerund-meta-v1\x00"

I64 = npt.NDArray[np.int64]


class Cls(enum.IntEnum):
    EVT = 0
    AGG = 1
    RAW = 2


class LossReason(enum.IntEnum):
    EVICTED_CAP = 1  # spool full: oldest rows of the lowest class dropped
    EXPIRED_TTL = 2  # unsent past the class's time-to-live
    OVERFLOW = 3  # in-memory buffer overflowed before sealing
    NONFINITE = 4  # NaN/inf or out-of-range value cannot be sent as a scaled integer
    WRITE_FAILED = 5  # the spool could not store the batch (disk full, I/O error)


class DecodeError(EdgerundError, ValueError):
    """A payload that is not a valid v1 batch; the message says what and at which byte."""


@dataclass(frozen=True, slots=True)
class SeriesBlock:
    series_id: int
    t_ms: I64  # int64 ms since the Unix epoch, one per sample
    values: tuple[I64, ...]  # one int64 column per channel, scaled integers
    scale_exp: tuple[int, ...]  # per channel: value = int * 10**scale_exp
    period_ms: int = 0  # as decoded (the encoder picks it); informational

    def __post_init__(self) -> None:
        n = len(self.t_ms)
        if n == 0:
            raise ValueError("a series block needs at least one sample")
        if len(self.values) != len(self.scale_exp) or not 1 <= len(self.values) <= 255:
            raise ValueError(
                f"expected 1..255 channels with one scale each, got {len(self.values)} columns and {len(self.scale_exp)} scales"
            )
        for v in self.values:
            if len(v) != n:
                raise ValueError(f"expected {n} values per channel, got {len(v)}")

    @property
    def n(self) -> int:
        return len(self.t_ms)

    def floats(self, channel: int = 0) -> npt.NDArray[np.float64]:
        return dequantize(self.values[channel], self.scale_exp[channel])


@dataclass(frozen=True, slots=True)
class EventBlock:
    t_ms: int
    kind: str
    source: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LossBlock:
    reason: LossReason
    cls: Cls
    t_first_ms: int
    t_last_ms: int
    n_samples: int
    seqs: tuple[int, ...] = ()  # batch sequences that will never arrive (evicted rows)
    series_ids: tuple[int, ...] = ()


Block = SeriesBlock | EventBlock | LossBlock


@dataclass(frozen=True, slots=True)
class Batch:
    cls: Cls
    epoch: int
    seq: int
    schema_ver: int
    blocks: tuple[Block, ...]


@dataclass(frozen=True, slots=True)
class Signature:
    alg: int
    key_id: bytes  # 4 bytes: SHA-256(SubjectPublicKeyInfo DER)[:4]
    rs: bytes  # 64 bytes: r || s, big-endian


@dataclass(frozen=True, slots=True)
class Decoded:
    batch: Batch
    signature: Signature | None
    signed_bytes: bytes  # what the signature covers (empty when unsigned)


@dataclass(frozen=True, slots=True)
class Framed:
    """A payload split into header, (still compressed) body and trailer: nothing parsed."""

    flags: int
    epoch: int
    seq: int
    schema_ver: int
    body: bytes
    body_start: int
    signature: Signature | None
    signed_bytes: bytes  # what the signature covers (empty when unsigned)


# ---------------------------------------------------------------- scalar helpers


def quantize(values: npt.ArrayLike, scale_exp: int) -> tuple[I64, npt.NDArray[np.bool_]]:
    """Floats -> scaled integers; the mask says which could be represented."""
    v = np.asarray(values, dtype=np.float64)
    # Multiply by an exact power of ten rather than divide by 10**exp (0.01 is inexact).
    scaled = v * 10.0 ** (-scale_exp) if scale_exp <= 0 else v / 10.0**scale_exp
    ok = np.isfinite(scaled) & (np.abs(scaled) < float(MAX_ABS))
    out = np.zeros(v.shape, dtype=np.int64)
    out[ok] = np.rint(scaled[ok]).astype(np.int64)
    return out, ok


def dequantize(ints: npt.ArrayLike, scale_exp: int) -> npt.NDArray[np.float64]:
    a = np.asarray(ints, dtype=np.float64)
    # Dividing by 10**k gives the float nearest to the decimal (2153 / 100 == 21.53).
    return a / 10.0 ** (-scale_exp) if scale_exp < 0 else a * 10.0**scale_exp


def key_id_for(spki_der: bytes) -> bytes:
    return hashlib.sha256(spki_der).digest()[:4]


def put_uvarint(out: bytearray, v: int) -> None:
    if v < 0:
        raise ValueError(f"uvarint must be >= 0, got {v}")
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def zigzag(v: int) -> int:
    return (v << 1) if v >= 0 else ((-v) << 1) - 1


def unzigzag(z: int) -> int:
    return (z >> 1) if not z & 1 else -((z + 1) >> 1)


def put_svarint(out: bytearray, v: int) -> None:
    put_uvarint(out, zigzag(v))


def put_str(out: bytearray, s: str) -> None:
    b = s.encode("utf-8")
    put_uvarint(out, len(b))
    out += b


class Reader:
    """Bounds-checked cursor over a payload; every failure names the offset."""

    __slots__ = ("buf", "end", "pos", "what")

    def __init__(
        self, buf: bytes, pos: int = 0, end: int | None = None, what: str = "payload"
    ) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end
        self.what = what

    def fail(self, msg: str) -> DecodeError:
        return DecodeError(f"{self.what}: byte {self.pos}: {msg}")

    def u8(self, name: str) -> int:
        if self.pos >= self.end:
            raise self.fail(f"truncated: expected {name} (1 byte), got end of data")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def take(self, n: int, name: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"truncated: expected {n} bytes of {name}, got {self.end - self.pos}")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(b)

    def uvarint(self, name: str, limit: int = 1 << 63) -> int:
        shift = 0
        v = 0
        start = self.pos
        while True:
            if self.pos >= self.end:
                self.pos = start
                raise self.fail(f"truncated varint {name}")
            b = self.buf[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                self.pos = start
                raise self.fail(f"varint {name} longer than 10 bytes")
        if b == 0 and self.pos - start > 1:
            self.pos = start
            raise self.fail(f"non-canonical varint {name} (trailing zero byte)")
        if v > limit:
            self.pos = start
            raise self.fail(f"{name} = {v} out of range (max {limit})")
        return v

    def svarint(self, name: str) -> int:
        v = unzigzag(self.uvarint(name, limit=(1 << 64) - 1))
        if abs(v) > 1 << 62:
            raise self.fail(f"{name} = {v} out of range (|v| <= 2**62)")
        return v

    def string(self, name: str, limit: int = 1 << 20) -> str:
        n = self.uvarint(f"{name} length", limit=limit)
        raw = self.take(n, name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{name} is not UTF-8: {exc}") from None

    def done(self, name: str) -> None:
        if self.pos != self.end:
            raise self.fail(f"{self.end - self.pos} unexpected bytes after {name}")


# ---------------------------------------------------------------- integer columns

_VARINT_THRESHOLDS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)


def _zz(a: I64) -> npt.NDArray[np.uint64]:
    return ((a << 1) ^ (a >> 63)).astype(np.uint64)


def _varint_bytes(z: npt.NDArray[np.uint64]) -> int:
    return int(np.searchsorted(_VARINT_THRESHOLDS, z, side="right").sum()) + len(z)


_POW2 = np.array([1 << k for k in range(64)], dtype=np.uint64)


def _bitwidth(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    # Exact bit length of uint64 values: how many powers of two are <= x (float log2
    # would round near large powers of two).
    return np.searchsorted(_POW2, x, side="right").astype(np.int64)


def _for_plan(r: I64, mb: int) -> tuple[int, I64, npt.NDArray[np.int64]]:
    """Size, refs and widths of frame-of-reference bit-packing in miniblocks of `mb`."""
    starts = np.arange(0, len(r), mb)
    lo = np.minimum.reduceat(r, starts)
    hi = np.maximum.reduceat(r, starts)
    widths = _bitwidth((hi - lo).astype(np.uint64))
    counts = np.diff(np.append(starts, len(r)))
    size = _varint_bytes(_zz(lo)) + len(starts) + int(((counts * widths + 7) // 8).sum())
    return size, lo, widths


def _svarint_len(v: int) -> int:
    z = zigzag(v)
    return max(1, (z.bit_length() + 6) // 7)


def _diff(x: I64, d: int) -> tuple[list[int], I64]:
    heads: list[int] = []
    cur = x
    for _ in range(min(d, len(x))):
        heads.append(int(cur[0]))
        cur = np.diff(cur)
    if len(x) <= d:
        return heads, np.zeros(0, dtype=np.int64)
    return heads, cur


def _candidates(x: I64) -> list[tuple[int, int, int, int, list[int], I64]]:
    """(size, order, encoding, miniblock code, heads, residuals) for every choice."""
    out: list[tuple[int, int, int, int, list[int], I64]] = []
    for d in (0, 1, 2):
        heads, r = _diff(x, d)
        hsize = sum(_svarint_len(h) for h in heads)
        out.append((hsize + (_varint_bytes(_zz(r)) if len(r) else 0), d, ENC_VARINT, 0, heads, r))
        if len(r):
            for m in range(4):
                if m and MINIBLOCK << (m - 1) >= len(r):
                    break  # a bigger miniblock than the column changes nothing
                out.append((hsize + _for_plan(r, MINIBLOCK << m)[0], d, ENC_FOR, m, heads, r))
    return out


def _encode_column(out: bytearray, x: I64) -> None:
    """Pick the smallest (order, encoding, miniblock size) for this column and append it."""
    _, d, enc, m, heads, r = min(_candidates(x), key=lambda c: c[0])
    out.append((m << 6) | (d << 4) | enc)
    for h in heads:
        put_svarint(out, h)
    if enc == ENC_VARINT:
        for z in _zz(r).tolist():
            put_uvarint(out, int(z))
        return
    mb = MINIBLOCK << m
    _, los, widths = _for_plan(r, mb)
    for lo, width, i in zip(los.tolist(), widths.tolist(), range(0, len(r), mb), strict=True):
        put_svarint(out, lo)
        out.append(width)
        if width:
            off = (r[i : i + mb] - lo).astype(np.uint64)
            bits = (off[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
            out += np.packbits(bits.astype(np.uint8).ravel(), bitorder="little").tobytes()


def _column_size(x: I64) -> int:
    return 1 + min(c[0] for c in _candidates(x))


def _decode_column(rd: Reader, n: int, name: str) -> I64:
    spec = rd.u8(f"{name} spec")
    m, d, enc = spec >> 6, (spec >> 4) & 0x03, spec & 0x0F
    if d > 2 or enc not in (ENC_VARINT, ENC_FOR) or (enc == ENC_VARINT and m):
        rd.pos -= 1
        raise rd.fail(
            f"{name}: unknown column spec 0x{spec:02x} (expected order 0..2, encoding 0..1,"
            " miniblock code 0 for varints)"
        )
    mb = MINIBLOCK << m
    nh = min(d, n)
    heads = [rd.svarint(f"{name} head") for _ in range(nh)]
    m = n - nh
    if enc == ENC_VARINT:
        r = np.fromiter((rd.svarint(name) for _ in range(m)), dtype=np.int64, count=m)
    else:
        parts: list[I64] = []
        left = m
        while left > 0:
            k = min(mb, left)
            lo = rd.svarint(f"{name} miniblock ref")
            width = rd.u8(f"{name} miniblock width")
            if width > 63:
                rd.pos -= 1
                raise rd.fail(f"{name}: miniblock width {width} > 63")
            if width == 0:
                parts.append(np.full(k, lo, dtype=np.int64))
            else:
                raw = np.frombuffer(
                    rd.take((k * width + 7) // 8, f"{name} packed bits"), dtype=np.uint8
                )
                bits = np.unpackbits(raw, bitorder="little")[: k * width].reshape(k, width)
                off = (bits.astype(np.uint64) << np.arange(width, dtype=np.uint64)).sum(
                    axis=1, dtype=np.uint64
                )
                if int(off.max()) + lo > 1 << 62:
                    raise rd.fail(f"{name}: miniblock value out of range")
                parts.append(off.astype(np.int64) + lo)
            left -= k
        r = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    # Undo the differencing; float shadow sums catch int64 wrap-around on hostile input.
    x = r
    for h in reversed(heads):
        if abs(float(np.abs(x.astype(np.float64)).sum()) + abs(h)) > float(1 << 62):
            raise rd.fail(f"{name}: values out of range after differencing")
        x = np.concatenate(([h], h + np.cumsum(x))).astype(np.int64)
    if len(x) != n:  # pragma: no cover - structurally impossible
        raise rd.fail(f"{name}: expected {n} values, got {len(x)}")
    return x


# ---------------------------------------------------------------- blocks


def _encode_series(b: SeriesBlock) -> bytes:
    t = np.asarray(b.t_ms, dtype=np.int64)
    if int(t.min()) < 0 or int(t.max()) >= MAX_ABS:
        raise ValueError(f"series {b.series_id}: timestamps must be 0 <= t_ms < 2**60")
    for v in b.values:
        if len(v) and int(np.abs(np.asarray(v, dtype=np.int64)).max()) >= MAX_ABS:
            raise ValueError(f"series {b.series_id}: scaled values must satisfy |v| < 2**60")
    t0 = int(t[0])
    rel = t - t0
    idx = np.arange(len(t), dtype=np.int64)
    # Candidate periods: none (delta-of-delta), the hint, the median step and its round
    # values (a 1000 ms schedule read with jitter has a median step of 999..1001).
    candidates = {0}
    if b.period_ms > 0:
        candidates.add(b.period_ms)
    if len(t) >= 3:
        med = float(np.median(np.diff(t)))
        for digits in (0, -1, -2, -3):
            p = int(round(med, digits))
            if p > 0:
                candidates.add(p)
    period = min(sorted(candidates), key=lambda p: _column_size(rel - idx * p) + _svarint_len(p))
    out = bytearray()
    put_uvarint(out, b.series_id)
    put_uvarint(out, len(t))
    put_uvarint(out, t0)
    put_uvarint(out, period)
    _encode_column(out, rel - idx * period)
    out.append(len(b.values))
    for s, v in zip(b.scale_exp, b.values, strict=True):
        if not -64 <= s <= 63:
            raise ValueError(f"scale_exp must be -64..63, got {s}")
        put_svarint(out, s)
        _encode_column(out, np.asarray(v, dtype=np.int64))
    return bytes(out)


def _decode_series(rd: Reader, budget: list[int]) -> SeriesBlock:
    sid = rd.uvarint("series_id", limit=(1 << 32) - 1)
    n = rd.uvarint("sample count", limit=MAX_VALUES)
    if n == 0:
        raise rd.fail("series block with 0 samples")
    t0 = rd.uvarint("t0_ms", limit=MAX_ABS - 1)
    period = rd.uvarint("period_ms", limit=1 << 40)
    rel = _decode_column(rd, n, "timestamps")
    t = rel + np.arange(n, dtype=np.int64) * period + t0
    if int(t.min()) < 0 or int(t.max()) >= MAX_ABS:
        raise rd.fail("timestamps out of range")
    nch = rd.u8("channel count")
    if nch == 0:
        raise rd.fail("series block with 0 channels")
    budget[0] -= n * (nch + 1)
    if budget[0] < 0:
        raise rd.fail(f"more than {MAX_VALUES} values in one batch")
    scales: list[int] = []
    cols: list[I64] = []
    for c in range(nch):
        s = rd.svarint(f"channel {c} scale_exp")
        if not -64 <= s <= 63:
            raise rd.fail(f"channel {c} scale_exp {s} out of range -64..63")
        scales.append(s)
        cols.append(_decode_column(rd, n, f"channel {c}"))
    return SeriesBlock(sid, t, tuple(cols), tuple(scales), period)


def _encode_event(b: EventBlock) -> bytes:
    out = bytearray()
    put_uvarint(out, b.t_ms)
    put_str(out, b.kind)
    put_str(out, b.source)
    put_str(
        out, json.dumps(b.fields, separators=(",", ":"), default=_json_default, allow_nan=False)
    )
    return bytes(out)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _decode_event(rd: Reader) -> EventBlock:
    t = rd.uvarint("event t_ms", limit=MAX_ABS - 1)
    kind = rd.string("event kind", limit=256)
    source = rd.string("event source", limit=256)
    text = rd.string("event fields")
    try:
        fields = loads_bounded(text, "event fields")
    except DecodeError as exc:
        raise rd.fail(str(exc)) from None
    if not isinstance(fields, dict):
        raise rd.fail(f"event fields: expected a JSON object, got {type(fields).__name__}")
    return EventBlock(t, kind, source, fields)


def _encode_loss(b: LossBlock) -> bytes:
    out = bytearray()
    put_uvarint(out, int(b.reason))
    out.append(int(b.cls))
    put_uvarint(out, b.t_first_ms)
    put_uvarint(out, max(0, b.t_last_ms - b.t_first_ms))
    put_uvarint(out, b.n_samples)
    seqs = sorted(set(b.seqs))
    put_uvarint(out, len(seqs))
    prev = 0
    for s in seqs:
        put_uvarint(out, s - prev)
        prev = s
    put_uvarint(out, len(b.series_ids))
    for sid in b.series_ids:
        put_uvarint(out, sid)
    return bytes(out)


def _decode_loss(rd: Reader) -> LossBlock:
    reason_v = rd.uvarint("loss reason", limit=255)
    try:
        reason = LossReason(reason_v)
    except ValueError:
        raise rd.fail(f"unknown loss reason {reason_v}") from None
    cls_v = rd.u8("loss class")
    if cls_v > 2:
        raise rd.fail(f"unknown loss class {cls_v}")
    t0 = rd.uvarint("loss t_first_ms", limit=MAX_ABS - 1)
    dt = rd.uvarint("loss duration", limit=MAX_ABS - 1)
    n = rd.uvarint("loss sample count")
    k = rd.uvarint("loss seq count", limit=MAX_VALUES)
    seqs: list[int] = []
    prev = 0
    for _ in range(k):
        d = rd.uvarint("loss seq delta", limit=1 << 62)
        if d == 0 and seqs:
            raise rd.fail("loss seqs not strictly increasing")
        prev += d
        seqs.append(prev)
    m = rd.uvarint("loss series count", limit=MAX_VALUES)
    sids = tuple(rd.uvarint("loss series id", limit=(1 << 32) - 1) for _ in range(m))
    return LossBlock(reason, Cls(cls_v), t0, t0 + dt, n, tuple(seqs), sids)


# ---------------------------------------------------------------- batches

_ZC = zstandard.ZstdCompressor(level=3, write_checksum=False, write_content_size=True)


def encode(batch: Batch, *, compress: bool = True) -> bytes:
    """Batch -> unsigned payload. Raises ValueError on unrepresentable input."""
    body = bytearray()
    put_uvarint(body, len(batch.blocks))
    for b in batch.blocks:
        if isinstance(b, SeriesBlock):
            kind, raw = BLOCK_SERIES, _encode_series(b)
        elif isinstance(b, EventBlock):
            kind, raw = BLOCK_EVENT, _encode_event(b)
        else:
            kind, raw = BLOCK_LOSS, _encode_loss(b)
        body.append(kind)
        put_uvarint(body, len(raw))
        body += raw
    flags = int(batch.cls) << CLS_SHIFT
    payload_body = bytes(body)
    if compress:
        z = _ZC.compress(payload_body)
        if len(z) < len(payload_body) <= zstd_output_cap(len(z)):
            payload_body = z
            flags |= FLAG_ZSTD
    out = bytearray([VERSION, flags])
    put_uvarint(out, batch.epoch)
    put_uvarint(out, batch.seq)
    put_uvarint(out, batch.schema_ver)
    put_uvarint(out, len(payload_body))
    out += payload_body
    return bytes(out)


def header_end(payload: bytes) -> int:
    """Offset of the trailer (== len for unsigned payloads); raises DecodeError."""
    rd = Reader(payload)
    _parse_header(rd)
    n = rd.uvarint("body length", limit=MAX_BODY)
    rd.take(n, "body")
    return rd.pos


def signing_bytes(payload: bytes) -> bytes:
    """The bytes a signature covers: the unsigned payload with the SIGNED flag set."""
    if len(payload) < 2 or payload[1] & FLAG_SIGNED:
        raise ValueError("expected an unsigned payload")
    return bytes([payload[0], payload[1] | FLAG_SIGNED]) + payload[2:]


def signing_digest(payload: bytes) -> bytes:
    return hashlib.sha256(signing_bytes(payload)).digest()


def attach_signature(payload: bytes, sig: Signature) -> bytes:
    if len(sig.key_id) != 4 or len(sig.rs) != 64:
        raise ValueError("expected a 4-byte key id and a 64-byte r||s signature")
    return signing_bytes(payload) + bytes([sig.alg]) + sig.key_id + sig.rs


def der_to_rs(der: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def rs_to_der(rs: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    return encode_dss_signature(int.from_bytes(rs[:32], "big"), int.from_bytes(rs[32:], "big"))


def _parse_header(rd: Reader) -> tuple[int, int, int, int]:
    v = rd.u8("version")
    if v != VERSION:
        rd.pos -= 1
        raise rd.fail(f"unsupported version {v} (expected {VERSION})")
    flags = rd.u8("flags")
    if flags & FLAG_RESERVED:
        rd.pos -= 1
        raise rd.fail(f"reserved flag bits set: 0x{flags:02x}")
    if (flags & CLS_MASK) >> CLS_SHIFT > 2:
        rd.pos -= 1
        raise rd.fail(f"unknown class {(flags & CLS_MASK) >> CLS_SHIFT}")
    epoch = rd.uvarint("spool_epoch")
    seq = rd.uvarint("batch_seq")
    return flags, epoch, seq, rd.uvarint("schema_ver", limit=(1 << 32) - 1)


def zstd_output_cap(compressed_len: int, max_body: int = MAX_BODY) -> int:
    """The most bytes a zstd body of `compressed_len` bytes may expand to."""
    return min(max_body, max(ZSTD_FLOOR, MAX_ZSTD_RATIO * compressed_len))


def unframe(payload: bytes, *, max_body: int = MAX_BODY) -> Framed:
    """Split header, body and signature trailer; the body is neither decompressed nor parsed.

    Cheap and linear in the payload: what a backend runs before the signature check.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    rd = Reader(payload)
    flags, epoch, seq, schema = _parse_header(rd)
    blen = rd.uvarint("body length", limit=max_body)
    body_start = rd.pos
    body = rd.take(blen, "body")
    sig_end = rd.pos
    signature: Signature | None = None
    if flags & FLAG_SIGNED:
        alg = rd.u8("signature algorithm")
        if alg != SIG_ALG_ECDSA_P256_SHA256:
            rd.pos -= 1
            raise rd.fail(f"unknown signature algorithm {alg} (expected 1)")
        key_id = rd.take(4, "signature key id")
        signature = Signature(alg, key_id, rd.take(64, "signature r||s"))
    rd.done("the batch")
    signed = payload[:sig_end] if signature else b""
    return Framed(flags, epoch, seq, schema, body, body_start, signature, signed)


def _decompress(f: Framed, max_body: int) -> bytes:
    cap = zstd_output_cap(len(f.body), max_body)
    try:
        params = zstandard.get_frame_parameters(f.body)
        if params.content_size in (0, zstandard.CONTENTSIZE_UNKNOWN) or params.content_size > cap:
            raise DecodeError(
                f"payload: byte {f.body_start}: zstd frame content size {params.content_size} "
                f"missing or above {cap} ({len(f.body)} compressed bytes may expand at most "
                f"{MAX_ZSTD_RATIO}x, and to at least {ZSTD_FLOOR})"
            )
        return bytes(zstandard.ZstdDecompressor().decompress(f.body, max_output_size=cap))
    except zstandard.ZstdError as exc:
        raise DecodeError(f"payload: byte {f.body_start}: bad zstd body: {exc}") from None


def decode_framed(f: Framed, *, max_body: int = MAX_BODY) -> Decoded:
    """Decompress (capped) and parse the body of an unframed payload."""
    body = _decompress(f, max_body) if f.flags & FLAG_ZSTD else f.body
    brd = Reader(body, what="body")
    nblocks = brd.uvarint("block count", limit=1 << 20)
    blocks: list[Block] = []
    budget = [MAX_VALUES]
    for i in range(nblocks):
        kind = brd.u8(f"block {i} type")
        blen_i = brd.uvarint(f"block {i} length", limit=len(body))
        if brd.pos + blen_i > brd.end:
            raise brd.fail(f"block {i}: length {blen_i} runs past the body")
        sub = Reader(body, brd.pos, brd.pos + blen_i, what=f"body block {i}")
        if kind == BLOCK_SERIES:
            blocks.append(_decode_series(sub, budget))
        elif kind == BLOCK_EVENT:
            blocks.append(_decode_event(sub))
        elif kind == BLOCK_LOSS:
            blocks.append(_decode_loss(sub))
        else:
            raise brd.fail(f"block {i}: unknown block type {kind} (expected 1..3)")
        sub.done(f"block {i}")
        brd.pos += blen_i
    brd.done("the last block")
    cls = Cls((f.flags & CLS_MASK) >> CLS_SHIFT)
    batch = Batch(cls, f.epoch, f.seq, f.schema_ver, tuple(blocks))
    return Decoded(batch, f.signature, f.signed_bytes)


def decode(payload: bytes, *, max_body: int = MAX_BODY) -> Decoded:
    """Payload -> batch and signature. Raises DecodeError on anything unexpected."""
    return decode_framed(unframe(payload, max_body=max_body), max_body=max_body)


def verify_signature(signature: Signature | None, signed_bytes: bytes, public_key: Any) -> bool:
    """Check a trailer against an EllipticCurvePublicKey (cryptography)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    if signature is None:
        return False
    digest = hashlib.sha256(signed_bytes).digest()
    try:
        public_key.verify(rs_to_der(signature.rs), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError):
        return False
    return True


def verify(decoded: Decoded, public_key: Any) -> bool:
    """Check a decoded batch's trailer against an EllipticCurvePublicKey (cryptography)."""
    return verify_signature(decoded.signature, decoded.signed_bytes, public_key)


# ---------------------------------------------------------------- bounded JSON, signed meta


def loads_bounded(text: str | bytes, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads that raises only DecodeError: depth capped, Python's huge-number refusal
    (ValueError) and recursion turned into DecodeError naming `what`."""
    try:
        s = text.decode("utf-8") if isinstance(text, bytes | bytearray) else text
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not UTF-8: {exc}") from None
    if too_deep(s, max_depth):
        raise DecodeError(f"{what}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(s)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit
        raise DecodeError(f"{what} is not acceptable JSON: {str(exc)[:200]}") from None


def _canonical_meta(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def meta_signing_digest(doc: dict[str, Any]) -> bytes:
    """SHA-256 over the domain tag and the canonical JSON of `doc` without its `sig`."""
    return hashlib.sha256(META_DOMAIN + _canonical_meta(doc)).digest()


def with_meta_signature(doc: dict[str, Any], key_id: bytes, rs: bytes) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k != "sig"}
    out["sig"] = {"alg": "ecdsa-p256-sha256", "key_id": key_id.hex(), "rs": rs.hex()}
    return out


def meta_signature(doc: dict[str, Any]) -> Signature | None:
    """The signature a meta document carries; DecodeError when `sig` is malformed."""
    sig = doc.get("sig")
    if sig is None:
        return None
    try:
        if not isinstance(sig, dict) or sig.get("alg") != "ecdsa-p256-sha256":
            raise ValueError("alg")
        key_id, rs = bytes.fromhex(str(sig["key_id"])), bytes.fromhex(str(sig["rs"]))
    except (ValueError, KeyError, TypeError):
        raise DecodeError("meta: malformed `sig` (expected alg, key_id and rs)") from None
    if len(key_id) != 4 or len(rs) != 64:
        raise DecodeError("meta: `sig` key_id must be 4 bytes and rs 64 bytes")
    return Signature(SIG_ALG_ECDSA_P256_SHA256, key_id, rs)


def verify_meta(doc: dict[str, Any], public_key: Any) -> bool:
    sig = meta_signature(doc)
    if sig is None:
        return False
    # verify_signature hashes what it is given: hand it the exact pre-image.
    return verify_signature(sig, META_DOMAIN + _canonical_meta(doc), public_key)


def to_json(
    decoded: Decoded, meta: dict[int, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One JSON-able record per block (columnar for series), names from meta when known."""
    b = decoded.batch
    base = {
        "epoch": b.epoch,
        "seq": b.seq,
        "cls": b.cls.name.lower(),
        "schema_ver": b.schema_ver,
        "signed": decoded.signature is not None,
    }
    out: list[dict[str, Any]] = []
    for blk in b.blocks:
        rec: dict[str, Any] = dict(base)
        if isinstance(blk, SeriesBlock):
            m = (meta or {}).get(blk.series_id, {})
            names: Sequence[str] = m.get("channels") or [f"ch{i}" for i in range(len(blk.values))]
            rec.update(
                type="series",
                series_id=blk.series_id,
                name=m.get("name"),
                unit=m.get("unit"),
                t_ms=blk.t_ms.tolist(),
                values={
                    str(names[i]) if i < len(names) else f"ch{i}": blk.floats(i).tolist()
                    for i in range(len(blk.values))
                },
            )
        elif isinstance(blk, EventBlock):
            rec.update(
                type="event", t_ms=blk.t_ms, kind=blk.kind, source=blk.source, fields=blk.fields
            )
        else:
            rec.update(
                type="loss",
                reason=blk.reason.name.lower(),
                loss_cls=blk.cls.name.lower(),
                t_first_ms=blk.t_first_ms,
                t_last_ms=blk.t_last_ms,
                n_samples=blk.n_samples,
                seqs=list(blk.seqs),
                series_ids=list(blk.series_ids),
                series=[(meta or {}).get(s, {}).get("name") for s in blk.series_ids],
            )
        out.append(rec)
    if not out:
        out.append(dict(base, type="empty"))
    return out
