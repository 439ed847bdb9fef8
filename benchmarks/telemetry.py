"""Telemetry benchmark: wire size of codec v1 against common encodings, spool throughput,
backlog drain rate.

Three seeded traces with epoch-ms timestamps and +-3 ms read-time jitter (kept exactly):
temperature 1 Hz / 6 h in 0.01 degC steps, voltage 10 Hz / 1 h in 1 mV steps (load steps,
ripple, noise), 3-axis accelerometer 100 Hz / 10 min as int16 (16384 LSB/g, 7 and 23 Hz
tones, 20 LSB noise). Every encoding is cut into the same 60 s batches; figures are payload
bytes per sample (accelerometer: one sample = 3 axes), without MQTT overhead.

Baselines, built in this run:
- JSON, one message per sample, and a JSON batch (gzip-6 and plain);
- SenML-CBOR (RFC 8428) batch: base name/time on the first record, relative times,
  integer labels (bn=-2, bt=-3, n=0, v=2, t=6); encoded with a minimal CBOR encoder here
  (cbor2 is not in this environment's package index) using the shortest exact float;
- Sparkplug B NDATA batch from the Eclipse Tahu schema (Payload: timestamp=1, metrics=2,
  seq=3; Metric: alias=2, timestamp=3, datatype=4, int_value=10, float_value=12; Float=9,
  Int16=2), one metric per sample with alias + ms timestamp + value, as Tahu does: encoded
  by the real `protobuf` library from benchmarks/sparkplug_b.proto (written from the
  public spec), and every batch also encoded by hand here and checked byte for byte
  against it, and decoded back by the library.

Signed, on the wire (issue #18): the simulator's whole series mix (`mix_sizes`: the real
hub over the emulated plant, every series raw through the real Batcher, each batch encoded
and ECDSA-signed as the uplink does and verified as the consumer does), overall and per
series (signed_temp / signed_volt: cabinet.temperature, battery.bus_voltage). The daemon
puts every series of a window into one batch, so one 69-byte trailer covers them all; the
per-series figures of the traces above add it to a one-series batch alone (the worst
case, `*_alone_signed_*`).

Spool: samples/s sealed (encoded + zstd) and committed with grouped commits, against one
commit (fsync) per batch. Drain: batches/s the uplink delivers from a backlog to a real
mosquitto (QoS 1, in-flight window, PUBACK before delete), against sequential plain
aiomqtt QoS 1 publishes of the same payloads.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import math
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgerund.telemetry import codec
from edgerund.telemetry.codec import Batch, Cls, SeriesBlock

EPOCH_MS = 1_767_225_600_000  # 2026-01-01
BATCH_S = 60


# ---------------------------------------------------------------- traces


def jittered(n: int, period_ms: int, rng: np.random.Generator) -> np.ndarray:
    return EPOCH_MS + np.arange(n, dtype=np.int64) * period_ms + rng.integers(-3, 4, n)


def temp_trace(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    n = 6 * 3600
    t = jittered(n, 1000, rng)
    s = np.arange(n) / 3600.0
    v = (
        22.0
        + 1.5 * np.sin(2 * np.pi * s / 24.0)
        + np.cumsum(rng.normal(0, 0.002, n))
        + rng.normal(0, 0.02, n)
    )
    return t, np.round(v, 2), -2


def volt_trace(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    n = 3600 * 10
    t = jittered(n, 100, rng)
    steps = np.repeat(rng.choice([0.0, -0.15, -0.3], n // 600 + 1), 600)[:n]
    ripple = 0.004 * np.sin(2 * np.pi * 0.7 * np.arange(n) / 10.0)
    v = 12.6 + steps + ripple + rng.normal(0, 0.0015, n)
    return t, np.round(v, 3), -3


def accel_trace(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = 600 * 100
    t = jittered(n, 10, rng)
    ts = np.arange(n) / 100.0
    vib = 0.05 * np.sin(2 * np.pi * 7 * ts) + 0.02 * np.sin(2 * np.pi * 23 * ts + 1.0)
    g = np.stack([vib, 0.5 * vib, 1.0 + 0.3 * vib], axis=1) * 16384 + rng.normal(0, 20, (n, 3))
    return t, np.clip(np.round(g), -32768, 32767).astype(np.int64)


def batches(t: np.ndarray) -> list[slice]:
    per = []
    start = 0
    edges = np.searchsorted(t, np.arange(t[0], t[-1] + BATCH_S * 1000, BATCH_S * 1000))
    for e in [*edges[1:].tolist(), len(t)]:
        if e > start:
            per.append(slice(start, e))
            start = e
    return per


# ---------------------------------------------------------------- encoders


def ours(t: np.ndarray, cols: list[np.ndarray], scale: int, seq: int) -> bytes:
    blk = SeriesBlock(1, t, tuple(cols), tuple([scale] * len(cols)))
    return codec.encode(Batch(Cls.RAW, 29_467_000, 100_000 + seq, 3, (blk,)))


def json_per_sample(t: np.ndarray, rows: list[dict[str, Any]]) -> int:
    return sum(
        len(json.dumps(dict(ts=int(ti), **r), separators=(",", ":")))
        for ti, r in zip(t, rows, strict=True)
    )


def json_batch(name: str, t: np.ndarray, vals: np.ndarray) -> bytes:
    data = [
        [int(ti), *(v.tolist() if isinstance(v, np.ndarray) else [v])]
        for ti, v in zip(t, vals, strict=True)
    ]
    return json.dumps({"series": name, "samples": data}, separators=(",", ":")).encode()


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([(major << 5) | n])
    for ai, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([(major << 5) | ai]) + struct.pack(fmt, n)
    raise ValueError(n)


def cbor(obj: Any) -> bytes:
    if isinstance(obj, bool):
        return b"\xf5" if obj else b"\xf4"
    if isinstance(obj, int):
        return _cbor_head(0, obj) if obj >= 0 else _cbor_head(1, -1 - obj)
    if isinstance(obj, float):
        if obj == int(obj) and abs(obj) < 2**53:
            return cbor(int(obj))
        for fmt, head in ((">e", b"\xf9"), (">f", b"\xfa")):
            try:
                packed = struct.pack(fmt, obj)
            except OverflowError:
                continue
            if struct.unpack(fmt, packed)[0] == obj:
                return head + packed
        return b"\xfb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        b = obj.encode()
        return _cbor_head(3, len(b)) + b
    if isinstance(obj, list):
        return _cbor_head(4, len(obj)) + b"".join(cbor(x) for x in obj)
    if isinstance(obj, dict):
        return _cbor_head(5, len(obj)) + b"".join(cbor(k) + cbor(v) for k, v in obj.items())
    raise TypeError(type(obj))


def senml_cbor(names: list[str], t: np.ndarray, vals: np.ndarray) -> bytes:
    bt = int(t[0]) / 1000.0
    recs: list[dict[int, Any]] = []
    for i, ti in enumerate(t):
        rel = round((int(ti) - int(t[0])) / 1000.0, 3)
        row = vals[i] if vals.ndim > 1 else [vals[i]]
        for j, name in enumerate(names):
            r: dict[int, Any] = {}
            if not recs:
                r[-2] = "urn:dev:gw1:"
                r[-3] = bt
            r[0] = name
            r[2] = float(row[j]) if not isinstance(row[j], np.integer) else int(row[j])
            if rel:
                r[6] = rel
            recs.append(r)
    return cbor(recs)


def _pb_varint(v: int) -> bytes:
    out = bytearray()
    codec.put_uvarint(out, v)
    return bytes(out)


def _pb_key(field: int, wire: int) -> bytes:
    return _pb_varint((field << 3) | wire)


def sparkplug_batch(
    aliases: list[int], t: np.ndarray, vals: np.ndarray, int16: bool, seq: int
) -> bytes:
    metrics = bytearray()
    for i, ti in enumerate(t):
        row = vals[i] if vals.ndim > 1 else [vals[i]]
        for j, alias in enumerate(aliases):
            m = bytearray()
            m += _pb_key(2, 0) + _pb_varint(alias)
            m += _pb_key(3, 0) + _pb_varint(int(ti))
            if int16:
                m += _pb_key(4, 0) + _pb_varint(2)  # Int16
                m += _pb_key(10, 0) + _pb_varint(
                    int(row[j]) & 0xFFFFFFFF
                )  # two's complement in uint32
            else:
                m += _pb_key(4, 0) + _pb_varint(9)  # Float
                m += _pb_key(12, 5) + struct.pack("<f", float(row[j]))
            metrics += _pb_key(2, 2) + _pb_varint(len(m)) + m
    return bytes(
        _pb_key(1, 0) + _pb_varint(int(t[-1])) + metrics + _pb_key(3, 0) + _pb_varint(seq % 256)
    )


def sparkplug_pb(
    payload_cls: Any, aliases: list[int], t: np.ndarray, vals: np.ndarray, int16: bool, seq: int
) -> bytes:
    """The same NDATA built and serialised by the protobuf library from the schema."""
    p = payload_cls(timestamp=int(t[-1]), seq=seq % 256)
    for i, ti in enumerate(t):
        row = vals[i] if vals.ndim > 1 else [vals[i]]
        for j, alias in enumerate(aliases):
            m = p.metrics.add(alias=alias, timestamp=int(ti), datatype=2 if int16 else 9)
            if int16:
                m.int_value = int(row[j]) & 0xFFFFFFFF
            else:
                m.float_value = float(row[j])
    return bytes(p.SerializeToString())


class SparkplugCheck:
    """Every hand-encoded Sparkplug batch against the protobuf library's own encoding of
    the same payload (benchmarks/sparkplug_b.proto): the bytes must be identical, and the
    library must decode the hand-encoded bytes back to the batch. The reported Sparkplug
    figure is the library's encoding."""

    def __init__(self) -> None:
        from benchmarks import sparkplug

        self.cls = sparkplug.load()
        self.checked = 0

    def size(
        self, aliases: list[int], t: np.ndarray, vals: np.ndarray, int16: bool, seq: int
    ) -> int:
        ours_pb = sparkplug_batch(aliases, t, vals, int16, seq)
        lib = sparkplug_pb(self.cls, aliases, t, vals, int16, seq)
        assert ours_pb == lib, "hand-written Sparkplug encoding differs from protobuf's"
        back = self.cls.FromString(ours_pb)
        assert len(back.metrics) == len(t) * len(aliases) and back.seq == seq % 256
        assert [m.timestamp for m in back.metrics[:: len(aliases)]] == [int(x) for x in t]
        self.checked += 1
        return len(lib)


# ---------------------------------------------------------------- size study


def sizes() -> dict[str, float]:
    sp = SparkplugCheck()
    rng = np.random.default_rng(42)
    out: dict[str, float] = {}
    for name, (t, v, scale) in (("temp", temp_trace(rng)), ("volt", volt_trace(rng))):
        n = len(t)
        tot = {
            "ours": 0,
            "ours_signed": 0,
            "json_sample": 0,
            "json_batch": 0,
            "json_gzip": 0,
            "senml_cbor": 0,
            "sparkplug": 0,
        }
        ints, ok = codec.quantize(v, scale)
        assert ok.all()
        for k, sl in enumerate(batches(t)):
            p = ours(t[sl], [ints[sl]], scale, k)
            d = codec.decode(p).batch.blocks[0]
            assert (
                isinstance(d, SeriesBlock)
                and np.array_equal(d.t_ms, t[sl])
                and np.array_equal(d.values[0], ints[sl])
            )
            tot["ours"] += len(p)
            tot["ours_signed"] += len(p) + codec.TRAILER_LEN
            tot["json_sample"] += json_per_sample(t[sl], [{"v": float(x)} for x in v[sl]])
            jb = json_batch(name, t[sl], v[sl])
            tot["json_batch"] += len(jb)
            tot["json_gzip"] += len(gzip.compress(jb, 6))
            tot["senml_cbor"] += len(senml_cbor([name], t[sl], v[sl]))
            tot["sparkplug"] += sp.size([1], t[sl], v[sl], False, k)
        for k2, b in tot.items():
            out[f"{name}_{k2}"] = b / n
    t, g = accel_trace(rng)
    n = len(t)
    tot = dict.fromkeys(
        (
            "ours",
            "ours_signed",
            "json_sample",
            "json_batch",
            "json_gzip",
            "senml_cbor",
            "sparkplug",
        ),
        0,
    )
    for k, sl in enumerate(batches(t)):
        p = ours(t[sl], [g[sl, 0], g[sl, 1], g[sl, 2]], 0, k)
        d = codec.decode(p).batch.blocks[0]
        assert isinstance(d, SeriesBlock) and all(
            np.array_equal(d.values[i], g[sl, i]) for i in range(3)
        )
        tot["ours"] += len(p)
        tot["ours_signed"] += len(p) + codec.TRAILER_LEN
        tot["json_sample"] += json_per_sample(
            t[sl], [{"x": int(a), "y": int(b), "z": int(c)} for a, b, c in g[sl]]
        )
        jb = json_batch("accel", t[sl], g[sl])
        tot["json_batch"] += len(jb)
        tot["json_gzip"] += len(gzip.compress(jb, 6))
        tot["senml_cbor"] += len(senml_cbor(["x", "y", "z"], t[sl], g[sl]))
        tot["sparkplug"] += sp.size([1, 2, 3], t[sl], g[sl], True, k)
    for k2, b in tot.items():
        out[f"accel_{k2}"] = b / n
    out["sparkplug_checked_batches"] = sp.checked
    return out


# ---------------------------------------------------------------- the simulator's mix, signed

# Resolutions an integrator would configure for the simulated parts (their LSBs): what the
# daemon sends is decided by these scales, so they are part of the figure.
MIX_SERIES = [
    {"match": "*.temperature", "scale_exp": -2},
    {"match": "*.humidity", "scale_exp": -2},
    {"match": "cabinet.pressure", "scale_exp": 0},
    {"match": "battery.bus_voltage", "scale_exp": -3},
    {"match": "battery.shunt_voltage", "scale_exp": -5},
    {"match": "motor_vib.accel_*", "scale_exp": -4},
    {"match": "motor_vib.gyro_*", "scale_exp": -2},
]
MIX_TEMP, MIX_VOLT = "cabinet.temperature", "battery.bus_voltage"


async def mix_sizes(seconds: float) -> dict[str, float]:
    """Every series of the simulated config, as the daemon sends them with `raw: true`.

    The real hub reads the emulated plant (REAL drivers, edgerund/data/simulate.yaml's
    sensors) for `seconds`; every sample goes through the telemetry `Batcher` (raw batches
    sealed at batch_max_age_s or batch_max_samples, all series of the window in one batch),
    each batch is encoded by the codec and signed with an ECDSA P-256 key exactly as the
    uplink signs (codec.signing_digest -> attach_signature). Bytes per sample are what goes
    on the wire, signature included. A series' share of a batch is what it adds to the
    batch (the batch's size minus its size encoded without that series) plus a share, by
    samples, of what the series have in common (header, zstd frame, signature trailer);
    the shares sum to the batch's signed size.
    """
    import msgspec
    import yaml
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    from edgerund.config.loader import simulate_config_path
    from edgerund.config.schema import Config
    from edgerund.context import EventBus, Supervisor
    from edgerund.hub import component as hub_component
    from edgerund.simulation import Simulation
    from edgerund.telemetry.batcher import Batcher
    from edgerund.telemetry.config import TelemetryConfig

    data = yaml.safe_load(simulate_config_path().read_text())
    cfg = msgspec.convert(
        {"gateway": {"id": "bench"}, "simulation": data["simulation"], "sensors": data["sensors"]},
        Config,
    )
    tcfg = msgspec.convert(
        {"series": [{**m, "raw": True} for m in MIX_SERIES] + [{"match": "*", "raw": True}]},
        TelemetryConfig,
    )
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    key_id = bytes(4)
    batcher = Batcher(tcfg, now_mono=time.monotonic())
    sealed: list[Any] = []
    ids: dict[str, int] = {}

    def take(sample: Any) -> None:
        batcher.ingest(sample)

    sim = Simulation(cfg)
    async with Supervisor(print) as sup:
        scope = sup.scope("hub")
        async with scope:
            hub = hub_component.build(
                cfg, resources=sim.resources, scope=scope, events=EventBus(), sim=sim
            )
            async with hub:
                unsubscribe = hub.subscribe(take)
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await asyncio.sleep(0.5)
                    if batcher.ids_pending:
                        for name in batcher.names():
                            ids.setdefault(name, len(ids) + 1)
                        batcher.assign_ids(ids)
                    sealed += batcher.tick(time.monotonic(), time.time())
                unsubscribe()
    if batcher.ids_pending:
        for name in batcher.names():
            ids.setdefault(name, len(ids) + 1)
        batcher.assign_ids(ids)
    sealed += [b for b in batcher.flush(time.monotonic(), time.time()) if b.cls is Cls.RAW]
    raw = [b for b in sealed if b.cls is Cls.RAW]
    name_of = {v: k for k, v in ids.items()}
    total_bytes = total_n = 0
    per: dict[str, list[float]] = {}  # name -> [bytes, samples]
    for seq, b in enumerate(raw):
        payload = codec.encode(Batch(Cls.RAW, 1, seq + 1, 1, b.blocks))
        der = key.sign(codec.signing_digest(payload), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        signed = codec.attach_signature(
            payload,
            codec.Signature(codec.SIG_ALG_ECDSA_P256_SHA256, key_id, codec.der_to_rs(der)),
        )
        got = codec.decode(signed)  # the consumer's path: split, verify, decode
        assert got.signature is not None
        pub.verify(
            codec.rs_to_der(got.signature.rs),
            hashlib.sha256(got.signed_bytes).digest(),
            ec.ECDSA(utils.Prehashed(hashes.SHA256())),
        )
        # a series' cost: what it adds to the batch (the batch encoded without it, left
        # out), plus a share of what all share (header, zstd frame, signature) by samples
        marginal = [
            len(payload)
            - len(codec.encode(Batch(Cls.RAW, 1, seq + 1, 1, b.blocks[:i] + b.blocks[i + 1 :])))
            for i in range(len(b.blocks))
        ]
        common = len(signed) - sum(marginal)
        n_batch = sum(blk.n for blk in b.blocks if isinstance(blk, SeriesBlock))
        total_bytes += len(signed)
        for blk, mb in zip(b.blocks, marginal, strict=True):
            assert isinstance(blk, SeriesBlock)
            e = per.setdefault(name_of[blk.series_id], [0.0, 0.0])
            e[0] += mb + common * blk.n / n_batch
            e[1] += blk.n
            total_n += blk.n
    out = {
        "mix_batches": float(len(raw)),
        "mix_series": float(len(per)),
        "mix_samples": float(total_n),
        "signed_mix": total_bytes / total_n,
    }
    for name, (nbytes, n) in per.items():
        out[f"series:{name}"] = nbytes / n
    out["signed_temp"] = out[f"series:{MIX_TEMP}"]
    out["signed_volt"] = out[f"series:{MIX_VOLT}"]
    return out


# ---------------------------------------------------------------- spool and drain


def spool_rate(commit_interval_s: float, n_batches: int, *, one_by_one: bool = False) -> float:
    """Samples/s appended and committed. one_by_one: wait for each batch's commit before
    handing over the next (what a spool without grouped commits does)."""
    from edgerund.telemetry.spool import Spool

    d = Path(tempfile.mkdtemp(prefix="tlm-bench-"))
    try:
        sp = Spool(
            d,
            max_bytes=512 << 20,
            ttl_s=dict.fromkeys(Cls, 1e9),
            commit_interval_s=commit_interval_s,
        )
        sp.open()
        rng = np.random.default_rng(1)
        t, v, scale = volt_trace(rng)
        ints, _ = codec.quantize(v, scale)
        sls = batches(t)
        t0 = time.perf_counter()
        futs = []
        n = 0
        for k in range(n_batches):
            sl = sls[k % len(sls)]
            futs.append(sp.append(Cls.RAW, [SeriesBlock(1, t[sl], (ints[sl],), (scale,))], 1))
            if one_by_one:
                sp.flush().result()
            n += sl.stop - sl.start
        sp.flush().result()  # commit the last group now rather than at its deadline
        for f in futs:
            f.result()
        dt = time.perf_counter() - t0
        sp.close()
        return n / dt
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def until(pred: Any, step_s: float = 0.005) -> None:
    while True:
        if pred():
            return
        await asyncio.sleep(step_s)


async def _no_dispatch(command: str, body: bytes) -> bytes | None:
    return None


async def drain(n_batches: int) -> tuple[float, float]:
    import aiomqtt

    from benchmarks.peers.mosquitto import Broker
    from edgerund.telemetry.config import UplinkConfig
    from edgerund.telemetry.spool import Spool
    from edgerund.telemetry.uplink import Uplink

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    d = Path(tempfile.mkdtemp(prefix="tlm-drain-"))
    broker = Broker(binary, d / "mq")
    broker.workdir.mkdir(parents=True)
    broker.start()
    try:
        rng = np.random.default_rng(2)
        t, v, scale = volt_trace(rng)
        ints, _ = codec.quantize(v, scale)
        sls = batches(t)
        picked = [sls[k % len(sls)] for k in range(n_batches)]
        payloads = [ours(t[sl], [ints[sl]], scale, k) for k, sl in enumerate(picked)]
        # baseline: sequential QoS 1 publishes, each awaited (PUBACK) before the next
        async with aiomqtt.Client(
            broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as c:
            t0 = time.perf_counter()
            for p in payloads:
                await c.publish("bench/raw", p, qos=1)
            base = len(payloads) / (time.perf_counter() - t0)
        loop = asyncio.get_running_loop()
        up: Uplink | None = None

        def woke() -> None:
            if up is not None:
                loop.call_soon_threadsafe(up.wake)

        sp = Spool(
            d / "spool",
            max_bytes=512 << 20,
            ttl_s=dict.fromkeys(Cls, 1e9),
            commit_interval_s=0.05,
            on_commit=woke,
        )
        await asyncio.to_thread(sp.open)
        for sl in picked:
            sp.append(Cls.RAW, [SeriesBlock(1, t[sl], (ints[sl],), (scale,))], 1)
        await asyncio.wrap_future(sp.flush())
        cfg = UplinkConfig(
            enabled=True,
            host=broker.host,
            port=broker.port,
            replay_bytes_per_s=1 << 30,
            replay_burst_bytes=1 << 30,
            inflight_max=16,
            # no consumer here, as in the baseline: the broker PUBACKs 0x10 (no
            # subscriber) and that completes a publish on both sides of the ratio
            require_subscriber=False,
        )
        up = Uplink(
            cfg,
            site="bench",
            gateway="gw",
            spool=sp,
            signer=None,
            meta=lambda: (1, "{}"),
            birth=dict,
            dispatch=_no_dispatch,
        )
        task = asyncio.create_task(up.run())
        await until(lambda: up is not None and up.stats.connected)
        t0 = time.perf_counter()
        await until(lambda: not sp.stats.backlog_batches)
        rate = n_batches / (time.perf_counter() - t0)
        await up.stop()
        task.cancel()
        await asyncio.to_thread(sp.close)
        return rate, base
    finally:
        broker.stop()
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--mix-s",
        type=float,
        default=130.0,
        help="seconds of the simulated plant for the signed mix (default 130: 4 raw batches)",
    )
    args = ap.parse_args()
    s = sizes()
    print(
        f"Sparkplug B: the hand encoding equals the protobuf library's for all "
        f"{s['sparkplug_checked_batches']} batches (benchmarks/sparkplug_b.proto)"
    )
    print("bytes per sample, 60 s batches (accelerometer: per 3-axis sample)")
    print(f"{'encoding':<24}{'temp 1 Hz':>12}{'volt 10 Hz':>12}{'accel 100 Hz':>14}")
    labels = [
        ("ours", "codec v1"),
        ("ours_signed", "codec v1 + signature"),
        ("json_sample", "JSON per sample"),
        ("json_batch", "JSON batch"),
        ("json_gzip", "JSON batch + gzip"),
        ("senml_cbor", "SenML-CBOR batch"),
        ("sparkplug", "Sparkplug B batch"),
    ]
    for key, label in labels:
        print(
            f"{label:<24}{s['temp_' + key]:>12.2f}{s['volt_' + key]:>12.2f}{s['accel_' + key]:>14.2f}"
        )
    for tr in ("temp", "volt", "accel"):
        print(
            f"{tr}: {s[f'{tr}_sparkplug'] / s[f'{tr}_ours']:.1f}x smaller than Sparkplug B, "
            f"{s[f'{tr}_json_gzip'] / s[f'{tr}_ours']:.1f}x smaller than gzip'd JSON, "
            f"{s[f'{tr}_senml_cbor'] / s[f'{tr}_ours']:.1f}x smaller than SenML-CBOR"
        )
    mix = asyncio.run(mix_sizes(args.mix_s))
    print(
        f"signed, on the wire (ECDSA P-256 trailer included), the simulator's whole mix "
        f"({mix['mix_series']:.0f} series, {mix['mix_samples']:.0f} samples in "
        f"{mix['mix_batches']:.0f} raw batches over {args.mix_s:g} s): "
        f"{mix['signed_mix']:.3f} B/sample; {MIX_TEMP} {mix['signed_temp']:.3f}, "
        f"{MIX_VOLT} {mix['signed_volt']:.3f} B/sample"
    )
    for k in sorted(k for k in mix if k.startswith("series:")):
        print(f"    {k[7:]:<32}{mix[k]:>8.3f} B/sample")
    print(
        f"    Sparkplug B (protobuf, same run) over signed codec: temp "
        f"{s['temp_sparkplug'] / mix['signed_temp']:.1f}x, volt "
        f"{s['volt_sparkplug'] / mix['signed_volt']:.1f}x; a one-series 60 s batch alone "
        f"signed: temp {s['temp_ours_signed']:.2f}, volt {s['volt_ours_signed']:.2f} B/sample"
    )
    grouped = spool_rate(1.0, 300)
    single = spool_rate(1.0, 100, one_by_one=True)
    print(
        f"spool: {grouped:,.0f} samples/s sealed and committed (grouped commits), "
        f"{grouped / single:.1f}x one commit per batch ({single:,.0f}/s)"
    )
    have_broker = shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()
    drain_rate = base_rate = float("nan")
    if have_broker:
        drain_rate, base_rate = asyncio.run(drain(300))
        print(
            f"drain: {drain_rate:.0f} batches/s from the spool to mosquitto (600-sample batches, "
            f"PUBACK before delete), {drain_rate / base_rate:.2f}x sequential aiomqtt QoS 1 ({base_rate:.0f}/s)"
        )
    else:
        print("drain: mosquitto not installed, skipped")
    figures = {
        "signed_temp_bytes_per_sample": round(mix["signed_temp"], 3),
        "signed_volt_bytes_per_sample": round(mix["signed_volt"], 3),
        "signed_mix_bytes_per_sample": round(mix["signed_mix"], 3),
        "signed_mix_series": int(mix["mix_series"]),
        "signed_mix_batches": int(mix["mix_batches"]),
        "sparkplug_over_signed_temp_ratio": round(s["temp_sparkplug"] / mix["signed_temp"], 2),
        "sparkplug_over_signed_volt_ratio": round(s["volt_sparkplug"] / mix["signed_volt"], 2),
        "sparkplug_checked_batches": s["sparkplug_checked_batches"],
        "temp_bytes_per_sample": round(s["temp_ours"], 3),
        "volt_bytes_per_sample": round(s["volt_ours"], 3),
        "accel_bytes_per_sample": round(s["accel_ours"], 3),
        "temp_alone_signed_bytes_per_sample": round(s["temp_ours_signed"], 3),
        "volt_alone_signed_bytes_per_sample": round(s["volt_ours_signed"], 3),
        "sparkplug_temp_bytes_per_sample": round(s["temp_sparkplug"], 3),
        "sparkplug_volt_bytes_per_sample": round(s["volt_sparkplug"], 3),
        "sparkplug_accel_bytes_per_sample": round(s["accel_sparkplug"], 3),
        "json_gzip_temp_bytes_per_sample": round(s["temp_json_gzip"], 3),
        "json_gzip_volt_bytes_per_sample": round(s["volt_json_gzip"], 3),
        "json_gzip_accel_bytes_per_sample": round(s["accel_json_gzip"], 3),
        "json_sample_temp_bytes_per_sample": round(s["temp_json_sample"], 3),
        "senml_cbor_temp_bytes_per_sample": round(s["temp_senml_cbor"], 3),
        "senml_cbor_volt_bytes_per_sample": round(s["volt_senml_cbor"], 3),
        "senml_cbor_accel_bytes_per_sample": round(s["accel_senml_cbor"], 3),
        "sparkplug_over_ours_temp_ratio": round(s["temp_sparkplug"] / s["temp_ours"], 2),
        "sparkplug_over_ours_volt_ratio": round(s["volt_sparkplug"] / s["volt_ours"], 2),
        "spool_samples_per_s": round(grouped),
        "spool_single_commit_samples_per_s": round(single),
        "drain_batches_per_s": None if math.isnan(drain_rate) else round(drain_rate, 1),
        "drain_baseline_batches_per_s": None if math.isnan(base_rate) else round(base_rate, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
