"""Model targets in the desired state, against the running simulated daemon (the real models
host, the real update pipeline) and a real mosquitto: the bundle is pulled from retained
chunks on the broker, survives a SIGKILL in the middle of the fetch (resumed from the
partial file, only the missing chunks fetched), is installed and reported `committed`; a
bundle whose golden vectors fail is `refused` with the reason while the old model keeps
running; a corrupted chunk fails the signed hash; every judgement is remembered across a
restart (no second fetch), and a newer desired version retries a transfer failure. A
target pins its model: `edgerunctl update` of another version is refused with
`pinned_by_twin` (also after a restart without the broker), `--override-twin` installs it
and the reported state says so."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiomqtt
import numpy as np
import pytest

from edgerund.backend import twin as T
from edgerund.backend.bundlestore import bundle_meta
from edgerund.publisher import build as B
from edgerund.publisher.build import load_private
from edgerund.twin.bundlewire import BundleMeta, chunk_topic, meta_topic
from tests.helpers.daemon import DaemonProcess, simulated

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "models" / "reference"
DEV = REPO / "models" / "dev-keys"
OPERATOR = load_private(DEV / "OPERATOR-DEVELOPMENT-ONLY.key")
PUBLISHER = load_private(DEV / "DEVELOPMENT-ONLY.key")
GW = "sim-gw"
CHUNK = 64 * 1024

pytestmark = pytest.mark.skipif(
    not (REF / "manifest.json").exists(), reason="reference model not present"
)


def _daemon(tmp: Path, broker: Any, **twin: Any) -> DaemonProcess:
    tmp.mkdir(exist_ok=True)
    return simulated(
        tmp,
        {
            "gateway": {"id": GW},
            "uplink": {"enabled": True, "host": broker.host, "port": broker.port},
            "twin": {"check_interval_s": 0.5, "probation_s": 1.0, **twin},
            "updates": {
                "probation_s": 0.5,
                "precheck_runs": 20,
                # Probation is judged in tests/updates; a loaded 2-core host must not roll
                # the genuine bundle back here.
                "probation": {"max_missed_ticks": 1_000_000, "max_faults": 1_000_000},
            },
        },
    )


def _bundle(out: Path, version: str, counter: int, golden: Path | None = None) -> Path:
    B.build_from_dir(
        REF, out, [PUBLISHER], version=version, security_counter=counter,
        exclude=("model_fp32.onnx",), health={"probation_s": 0.5}, golden=golden,
    )  # fmt: skip
    return out


def _bad_golden(out: Path) -> Path:
    """Golden vectors whose expected outputs the model does not reproduce."""
    with np.load(io.BytesIO(B.make_golden((REF / "model.onnx").read_bytes(), n=4))) as z:
        arrays = {k: z[k] + (1000.0 if k.startswith("out.") else 0.0) for k in z.files}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.write_bytes(buf.getvalue())
    return out


def _chunks(path: Path, meta: BundleMeta) -> list[bytes]:
    data = path.read_bytes()
    return [data[i * meta.chunk_bytes : (i + 1) * meta.chunk_bytes] for i in range(meta.chunks)]


async def _publish(broker: Any, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        for topic, payload in messages:
            await c.publish(topic, payload, qos=1, retain=True)


async def _offer(
    broker: Any, meta: BundleMeta, chunks: list[bytes], only: range | None = None
) -> None:
    idx = range(meta.chunks) if only is None else only
    msgs = [(chunk_topic(meta.sha256, i), chunks[i]) for i in idx]
    await _publish(broker, [*msgs, (meta_topic(meta.sha256), meta.to_json())])


async def _desired(broker: Any, version: int, meta: BundleMeta, model_version: str) -> None:
    target = {"version": model_version, "sha256": meta.sha256, "size": meta.size}
    doc = T.desired(GW, version, {}, OPERATOR, models={"motor-ae": target})
    await _publish(broker, [(f"twin/v1/sim/{GW}/desired", doc)])


async def _reported(
    broker: Any, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 150.0
) -> dict[str, Any]:
    last: dict[str, Any] = {}
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(f"twin/v1/sim/{GW}/reported", qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                async for msg in c.messages:
                    assert isinstance(msg.payload, bytes)
                    last = json.loads(msg.payload)["signed"]
                    if pred(last):
                        return last
        except TimeoutError:
            raise AssertionError(f"reported never matched; last: {last.get('desired')}") from None
    raise AssertionError("unreachable")


def target_is(
    dv: int, state: str, reason: str | None = None, min_bytes: int = 0
) -> Callable[[dict[str, Any]], bool]:
    def pred(doc: dict[str, Any]) -> bool:
        m = ((doc.get("desired") or {}).get("models") or {}).get("motor-ae") or {}
        return (
            m.get("desired_version") == dv
            and m.get("state") == state
            and (reason is None or m.get("reason") == reason)
            and int(m.get("bytes") or 0) >= min_bytes
        )

    return pred


def _model(d: DaemonProcess) -> dict[str, Any]:
    return {m["name"]: m for m in d.call("status")["updates"]["models"]}["motor-ae"]


def _fetches(d: DaemonProcess, sha: str) -> list[dict[str, Any]]:
    out = []
    for line in d.log_text.splitlines():
        if '"twin_bundle_fetching"' in line and sha in line:
            out.append(json.loads(line))
    return out


async def test_target_fetched_resumed_after_kill_and_committed(
    tmp_path: Path, mosquitto: Any
) -> None:
    path = _bundle(tmp_path / "good.bundle", "2.1.0", 2)
    meta = bundle_meta(path, CHUNK)
    chunks = _chunks(path, meta)
    assert meta.chunks >= 4
    half = meta.chunks // 2
    # Only the first half is on the broker yet: the fetch stalls there.
    await _offer(mosquitto, meta, chunks, range(half))
    d = _daemon(tmp_path / "gw", mosquitto)
    with d:
        d.wait_ready(90)
        assert _model(d)["version"] == "2.0.0"
        await _desired(mosquitto, 1, meta, "2.1.0")
        await _reported(mosquitto, target_is(1, "fetching", min_bytes=half * CHUNK))
        d.kill()  # SIGKILL in the middle of the fetch
    part = tmp_path / "gw" / "state" / "twin" / "bundles" / f"{meta.sha256}.part"
    assert part.read_bytes() == path.read_bytes()[: half * CHUNK]  # not corrupted

    await _offer(mosquitto, meta, chunks, range(half, meta.chunks))
    d2 = _daemon(tmp_path / "gw", mosquitto)
    with d2:
        d2.wait_ready(90)
        doc = await _reported(mosquitto, target_is(1, "committed"))
        m = doc["desired"]["models"]["motor-ae"]
        assert m["version"] == "2.1.0" and m["reason"] is None and m["bytes"] == meta.size
        assert next(x for x in doc["models"] if x["name"] == "motor-ae")["version"] == "2.1.0"
        assert _model(d2)["version"] == "2.1.0" and _model(d2)["state"] == "COMMITTED"
        # resumed where the killed daemon stopped, not from byte 0
        assert [f["resume_offset"] for f in _fetches(d2, meta.sha256)] == [0, half * CHUNK]
        assert not part.exists()

        # a newer desired version naming what already runs: committed at once, no fetch
        await _desired(mosquitto, 2, meta, "2.1.0")
        doc = await _reported(mosquitto, target_is(2, "committed"))
        assert doc["desired"]["models"]["motor-ae"]["message"] == "already active"
        assert len(_fetches(d2, meta.sha256)) == 2


async def test_refusals_reported_remembered_and_retried_by_newer_version(
    tmp_path: Path, mosquitto: Any
) -> None:
    bad = _bundle(tmp_path / "bad.bundle", "2.2.0", 2, golden=_bad_golden(tmp_path / "g.npz"))
    bad_meta = bundle_meta(bad, CHUNK)
    await _offer(mosquitto, bad_meta, _chunks(bad, bad_meta))
    good = _bundle(tmp_path / "good.bundle", "2.3.0", 3)
    meta = bundle_meta(good, CHUNK)
    chunks = _chunks(good, meta)
    corrupt = list(chunks)
    corrupt[1] = bytes(b ^ 0xFF for b in corrupt[1][:16]) + corrupt[1][16:]  # same length
    await _offer(mosquitto, meta, corrupt)

    d = _daemon(tmp_path / "gw", mosquitto)
    with d:
        d.wait_ready(90)
        # golden vectors fail at the precheck: refused, the old model keeps running
        await _desired(mosquitto, 1, bad_meta, "2.2.0")
        doc = await _reported(mosquitto, target_is(1, "refused", "golden_mismatch"))
        assert doc["desired"]["models"]["motor-ae"]["message"]
        m = _model(d)
        assert m["version"] == "2.0.0" and m["active_slot"] == "a"
        # a corrupted chunk: the file's hash is not the signed one
        await _desired(mosquitto, 2, meta, "2.3.0")
        await _reported(mosquitto, target_is(2, "refused", "hash_mismatch"))
        assert _model(d)["version"] == "2.0.0"
        assert not list((tmp_path / "gw" / "state" / "twin" / "bundles").glob("*.part"))

    d2 = _daemon(tmp_path / "gw", mosquitto)
    with d2:
        d2.wait_ready(90)
        # after a restart: the same outcome, from memory, without a second fetch
        await _reported(mosquitto, target_is(2, "refused", "hash_mismatch"))
        assert len(_fetches(d2, meta.sha256)) == 1
        # a newer version naming the refused bundle again: remembered, never fetched again
        await _desired(mosquitto, 3, bad_meta, "2.2.0")
        await _reported(mosquitto, target_is(3, "refused", "golden_mismatch"))
        assert len(_fetches(d2, bad_meta.sha256)) == 1
        # the backend republishes the bundle intact and bumps the version: retried
        await _offer(mosquitto, meta, chunks)
        await _desired(mosquitto, 4, meta, "2.3.0")
        await _reported(mosquitto, target_is(4, "committed"))
        assert _model(d2)["version"] == "2.3.0"
        assert len(_fetches(d2, meta.sha256)) == 2


async def test_target_pins_the_model_against_a_local_update(tmp_path: Path, mosquitto: Any) -> None:
    path = _bundle(tmp_path / "target.bundle", "2.1.0", 2)
    meta = bundle_meta(path, CHUNK)
    await _offer(mosquitto, meta, _chunks(path, meta))
    local = _bundle(tmp_path / "local.bundle", "2.2.0", 2)
    later = _bundle(tmp_path / "later.bundle", "2.3.0", 2)
    # The (empty) config fragment must pass its probation so the document is stored.
    d = _daemon(tmp_path / "gw", mosquitto, probation_missed_ticks_max=1_000_000)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "edgerund.ctl", "--socket", d.socket_path, "--timeout", "120"]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=150)

    with d:
        d.wait_ready(90)
        await _desired(mosquitto, 1, meta, "2.1.0")
        await _reported(mosquitto, target_is(1, "committed"))
        await _reported(mosquitto, lambda doc: doc["desired"].get("outcome") == "applied")
        r = await asyncio.to_thread(ctl, "update", str(local))
        assert r.returncode == 1, r.stdout
        assert "[pinned_by_twin]" in r.stderr, r.stderr
        assert "model motor-ae is pinned to 2.1.0 by desired version 1 of the twin" in r.stderr
        assert _model(d)["version"] == "2.1.0"

        r = await asyncio.to_thread(ctl, "update", "--override-twin", str(local))
        assert r.returncode == 0, r.stderr
        doc = await _reported(mosquitto, target_is(1, "overridden", "twin_override"))
        m = next(x for x in doc["models"] if x["name"] == "motor-ae")
        assert m["version"] == "2.2.0" and m["twin_override"] is True
        t = doc["desired"]["models"]["motor-ae"]
        assert t["version"] == "2.1.0" and t["active_version"] == "2.2.0"
        assert t["override"]["source"].startswith("socket:")

    # A restart with the broker out of reach: the pin comes from the applied document
    # (re-verified from its signature), not from the broker's retained copy.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = SimpleNamespace(host="127.0.0.1", port=s.getsockname()[1])
    assert (tmp_path / "gw" / "state" / "twin" / "applied.json").exists()
    d = _daemon(tmp_path / "gw", dead)
    with d:
        d.wait_ready(90)
        r = await asyncio.to_thread(ctl, "update", str(later))
        assert r.returncode == 1 and "[pinned_by_twin]" in r.stderr, (r.stdout, r.stderr)
        assert _model(d)["version"] == "2.2.0"


async def test_a_target_still_pins_after_a_restart_when_its_config_was_refused(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A document whose config fragment is refused still pins its model targets; they used
    to come back after a restart only when the broker re-delivered the document, so a
    restart while the broker was out of reach let any local version in."""
    local = _bundle(tmp_path / "local.bundle", "2.2.0", 2)
    running = {"version": "2.0.0", "sha256": "ab" * 32, "size": 4096}  # the shipped model
    forbidden = {"identity": {"kind": "software"}}
    d = _daemon(tmp_path / "gw", mosquitto)

    def update(path: Path) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "edgerund.ctl", "--socket", d.socket_path, "--timeout", "120"]
        return subprocess.run([*cmd, "update", str(path)], capture_output=True, text=True)

    with d:
        d.wait_ready(90)
        doc = T.desired(GW, 1, forbidden, OPERATOR, models={"motor-ae": running})
        await _publish(mosquitto, [(f"twin/v1/sim/{GW}/desired", doc)])
        await _reported(mosquitto, target_is(1, "committed"))
        await _reported(
            mosquitto,
            lambda doc: (
                (doc["desired"].get("outcome"), doc["desired"].get("reason"))
                == ("refused", "forbidden_key")
            ),
        )
        r = await asyncio.to_thread(update, local)
        assert r.returncode == 1 and "[pinned_by_twin]" in r.stderr, (r.stdout, r.stderr)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = SimpleNamespace(host="127.0.0.1", port=s.getsockname()[1])
    assert not (tmp_path / "gw" / "state" / "twin" / "applied.json").exists()
    d = _daemon(tmp_path / "gw", dead)
    with d:
        d.wait_ready(90)
        assert '"twin_offered_state_loaded"' in d.log_text
        r = await asyncio.to_thread(update, local)
        assert r.returncode == 1 and "[pinned_by_twin]" in r.stderr, (r.stdout, r.stderr)
        assert "pinned to 2.0.0 by desired version 1" in r.stderr
        assert _model(d)["version"] == "2.0.0"
