"""`edgerund telemetry decode` and the documented worked example (docs/telemetry.md §2.6)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgerund.telemetry import codec

REPO = Path(__file__).resolve().parents[2]
DOC_EXAMPLE = "01 08 f8 c2 86 0e 07 01 18 01 01 15 01 03 80 d0 ea b6 b7 33 00 20 00 d4 0f 09 01 03 01 d2 21 01 06"


def test_documented_example_is_what_the_encoder_writes() -> None:
    t = np.array([1767225600000, 1767225601002, 1767225601999], dtype=np.int64)
    v, _ = codec.quantize([21.53, 21.54, 21.54], -2)
    p = codec.encode(
        codec.Batch(codec.Cls.RAW, 29467000, 7, 1, (codec.SeriesBlock(1, t, (v,), (-2,)),)),
        compress=False,
    )
    assert p.hex(" ") == DOC_EXAMPLE


def _decode(args: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "telemetry", "decode", *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        timeout=60,
    )


def test_decode_cli_json_lines_and_errors(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps(
            {"series": [{"id": 1, "name": "cabinet.temp", "unit": "degC", "channels": ["value"]}]}
        )
    )
    r = _decode(["--meta", str(meta), "-"], bytes.fromhex(DOC_EXAMPLE))
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.decode().splitlines()[0])
    assert rec["name"] == "cabinet.temp" and rec["values"]["value"] == [21.53, 21.54, 21.54]
    assert rec["t_ms"][1] == 1767225601002 and (rec["epoch"], rec["seq"]) == (29467000, 7)
    hexfile = tmp_path / "p.hex"
    hexfile.write_text(
        DOC_EXAMPLE.replace(" ", "") + "\n" + "02" + DOC_EXAMPLE.replace(" ", "")[2:] + "\n"
    )
    r = _decode(["--hex", str(hexfile)], b"")
    assert r.returncode == 1
    assert len(r.stdout.decode().splitlines()) == 1  # the good payload is still printed
    assert b"payload 2: payload: byte 0: unsupported version 2 (expected 1)" in r.stderr
    r = _decode(["-"], bytes.fromhex(DOC_EXAMPLE)[:-3])
    assert r.returncode == 1 and b"truncated" in r.stderr


def _consume(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgerund.cli",
            "telemetry",
            "consume",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--client-id",
            "cli-consumer",
            "--group",
            "cli",
            *args,
        ],
        capture_output=True,
        cwd=REPO,
        timeout=60,
    )


def test_consume_cli_sqlite_dedup(tmp_path: Path, mosquitto: object) -> None:
    import asyncio

    import aiomqtt

    port = mosquitto.port  # type: ignore[attr-defined]
    db = tmp_path / "out.db"
    r = _consume(port, "--sqlite", str(db), "--duration-s", "1")  # creates the persistent session
    assert r.returncode == 0, r.stderr
    t = np.arange(5, dtype=np.int64) * 1000 + 1_767_225_600_000
    payloads = [
        codec.encode(
            codec.Batch(codec.Cls.RAW, 9, s, 1, (codec.SeriesBlock(4, t + s, (t % 11,), (-1,)),))
        )
        for s in (1, 2, 3)
    ]

    async def publish(items: list[bytes]) -> None:
        async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            for p in items:
                await c.publish("tlm/v1/lab/gwx/raw", p, qos=1)
            await c.publish("tlm/v1/lab/gwx/raw", b"\x07garbage", qos=1)

    asyncio.run(publish(payloads))
    r = _consume(port, "--sqlite", str(db), "--max-batches", "3", "--duration-s", "20")
    assert r.returncode == 0, r.stderr
    import sqlite3

    with sqlite3.connect(db) as c:
        assert (
            c.execute("SELECT COUNT(*) FROM batches WHERE gateway='gwx' AND epoch=9").fetchone()[0]
            == 3
        )
        assert c.execute("SELECT COUNT(*) FROM samples WHERE gateway='gwx'").fetchone()[0] == 15
    asyncio.run(publish(payloads[:1]))  # a duplicate, seen by a later consumer process
    r = _consume(port, "--sqlite", str(db), "--duration-s", "2")
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(db) as c:  # the database is the dedup set: still 3 batches
        assert c.execute("SELECT COUNT(*) FROM batches WHERE gateway='gwx'").fetchone()[0] == 3
        assert c.execute("SELECT COUNT(*) FROM samples WHERE gateway='gwx'").fetchone()[0] == 15
    asyncio.run(publish(payloads[:1] + payloads[:1]))
    r = _consume(port, "--out", str(tmp_path / "o.jsonl"), "--duration-s", "2")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    types = [x["type"] for x in lines]
    assert types.count("duplicate") == 1 and types.count("series") == 1
    assert any(x["type"] == "invalid" and "unsupported version 7" in x["error"] for x in lines)
    assert lines[-1] == {
        "type": "summary",
        "batches": 1,
        "duplicates": 1,
        "invalid": 1,
        "unverified": 2,  # counted per processed batch, duplicates included
    }
