"""`edgerund fleet rollout|resume|status|abort|devices` as processes, against a real
mosquitto and a real PostgreSQL, with protocol-level fake gateways (tests/backend/fakegw.py)
so a dozen gateways cost nothing: waves in order, the config patch kept, a bad bundle
halting after the first wave with the others untouched, a killed tool resuming from the
database without re-targeting anyone, abort with revert, the device view, and the schema
migration from version 1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgerund.backend import twin as T
from edgerund.publisher import build as B
from tests.backend.fakegw import FakeGateway, Fleet
from tests.fixtures.postgres import import_psycopg

psycopg = import_psycopg()

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "models" / "reference"
DEV = REPO / "models" / "dev-keys"
OPERATOR_KEY = DEV / "OPERATOR-DEVELOPMENT-ONLY.key"
OPERATOR = B.load_private(OPERATOR_KEY)


def bundle(tmp: Path, version: str, counter: int = 2) -> tuple[Path, str]:
    out = tmp / f"motor-ae-{version}.bundle"
    B.build_from_dir(
        REF,
        out,
        [B.load_private(DEV / "DEVELOPMENT-ONLY.key")],
        version=version,
        security_counter=counter,
        exclude=("model_fp32.onnx",),
        health={"probation_s": 0.5},
    )
    return out, hashlib.sha256(out.read_bytes()).hexdigest()


def fleet(broker: Any, n: int = 10, **kw: Any) -> list[FakeGateway]:
    gws = [FakeGateway(broker, f"gw-{i:02d}", f"plant-{'ab'[i % 2]}", **kw) for i in range(n)]
    return [*gws, FakeGateway(broker, "lab-01", "lab", **kw)]


async def cli(*args: str, timeout_s: float = 120.0) -> tuple[int, str, str]:
    p = await spawn_fleet(list(args))
    out, err = await asyncio.wait_for(p.communicate(), timeout_s)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


def broker_args(broker: Any) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port)]


def rollout_args(broker: Any, dsn: str, path: Path, rid: str, **kw: str) -> list[str]:
    opts = {
        "--select": "site=plant-*",
        "--waves": "1,30%,100%",
        "--halt-if": "rolled_back>0 or failed_rate>20%",
        "--soak": "1s",
        "--gateway-timeout": "60s",
        "--discover-s": "5",
    }
    opts.update(kw)
    flat = [x for kv in opts.items() for x in kv]
    return ["rollout", str(path), "--id", rid, "--key", str(OPERATOR_KEY), "--postgres", dsn,
            "--json", *flat, *broker_args(broker)]  # fmt: skip


async def status(dsn: str, rid: str) -> dict[str, Any]:
    rc, out, err = await cli("status", rid, "--postgres", dsn, "--json")
    assert rc == 0, err
    return dict(json.loads(out))


async def test_good_bundle_rolls_out_wave_by_wave_keeping_config(
    mosquitto: Any, pg_dsn: str, tmp_path: Path
) -> None:
    path, sha = bundle(tmp_path, "2.1.0")
    gws = fleet(mosquitto)
    # gw-03 already has a desired document: a config patch and another model's target
    prev = T.desired(
        "gw-03", 4, {"logging": {"level": "debug"}}, OPERATOR,
        models={"other": {"version": "1.0.0", "sha256": "ab" * 32, "size": 1}},
    )  # fmt: skip
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
        await c.publish("twin/v1/plant-b/gw-03/desired", prev, qos=1, retain=True)
    async with Fleet(gws) as f:
        rc, out, err = await cli(*rollout_args(mosquitto, pg_dsn, path, "good"))
        assert rc == 0, out + err
        events = [json.loads(x) for x in out.splitlines()]
        st = await status(pg_dsn, "good")
    assert st["state"] == "succeeded" and st["wave_ends"] == [1, 3, 10]
    assert st["counts"]["committed"] == 10 and st["counts"]["failed"] == 0
    by_wave: dict[int, list[str]] = {}
    for t in st["targets"]:
        by_wave.setdefault(t["wave"], []).append(t["gateway"])
    assert sorted(len(v) for v in by_wave.values()) == [1, 2, 7]
    # the lab gateway is not selected and never received anything
    assert f.gateways["lab-01"].received == []
    for name, g in f.gateways.items():
        if name == "lab-01":
            continue
        # exactly one desired document each from the rollout (gw-03 had one before)
        (doc,) = [d for d in g.docs() if "motor-ae" in d["models"]]
        assert doc["models"]["motor-ae"] == {
            "version": "2.1.0",
            "sha256": sha,
            "size": path.stat().st_size,
        }
        assert g.version == "2.1.0"
    d3 = f.gateways["gw-03"].docs()[-1]
    assert d3["version"] == 5 and d3["config"] == {"logging": {"level": "debug"}}
    assert d3["models"]["other"]["version"] == "1.0.0"
    # wave by wave: every gateway of wave N+1 got its document after every gateway of
    # wave N had committed and the soak (1 s) had passed
    first_at = {n: f.gateways[n].received[-1][0] for n in f.gateways if n != "lab-01"}
    for w in (1, 2):
        assert max(first_at[g] for g in by_wave[w]) + 1.0 <= min(
            first_at[g] for g in by_wave[w + 1]
        )
    kinds = [e["event"] for e in events]
    assert kinds.count("wave_started") == 3 and kinds.count("wave_done") == 3
    assert kinds[-1] == "succeeded"
    # the bundle is on the broker, retained, for the gateways to fetch
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
        await c.subscribe(f"bundles/v1/{sha}/meta")
        async with asyncio.timeout(5):
            msg = await anext(aiter(c.messages))
        assert isinstance(msg.payload, bytes) and json.loads(msg.payload)["sha256"] == sha


async def test_bad_bundle_halts_after_first_wave_and_says_why(
    mosquitto: Any, pg_dsn: str, tmp_path: Path
) -> None:
    path, sha = bundle(tmp_path, "2.1.0")
    async with Fleet(fleet(mosquitto, bad=frozenset({sha}))) as f:
        rc, out, err = await cli(*rollout_args(mosquitto, pg_dsn, path, "bad"))
        assert rc == 1, out + err
        st = await status(pg_dsn, "bad")
        await asyncio.sleep(1.5)  # nothing more may arrive after the halt
    assert st["state"] == "halted"
    assert "rolled_back=1" in st["reason"] and "probation_faults" in st["reason"]
    reached = [t for t in st["targets"] if t["status"] != "pending"]
    assert len(reached) == 1 and reached[0]["status"] == "failed"
    assert reached[0]["outcome"] == "rolled_back"
    got = [n for n, g in f.gateways.items() if g.received]
    assert got == [reached[0]["gateway"]]  # the other nine never received the target
    assert all(g.version == "2.0.0" for g in f.gateways.values())
    assert json.loads(out.splitlines()[-1])["event"] == "halted"
    # the human views: the list of rollouts, and the rollout with one line per gateway
    rc, out, err = await cli("status", "--postgres", pg_dsn)
    assert rc == 0 and out.startswith("bad  motor-ae 2.1.0  halted  wave 1/3  reached 1/10"), out
    rc, out, err = await cli("status", "bad", "--postgres", pg_dsn)
    assert rc == 0 and "halt rule 'rolled_back>0" in out
    assert f"{reached[0]['gateway']:<20} failed     rolled_back probation_faults" in out
    assert sum(line.endswith(" pending") for line in out.splitlines()) == 9
    rc, _, err = await cli("status", "nope", "--postgres", pg_dsn)
    assert rc == 1 and "no rollout 'nope'" in err


async def test_overridden_gateways_neither_hold_nor_halt_the_rollout(
    mosquitto: Any, pg_dsn: str, tmp_path: Path
) -> None:
    """Model pins (docs/twin.md §5.2) in a rollout: on one gateway of the last wave a
    technician installs 2.2.0 over the target (`--override-twin`), another already runs
    an override of 2.5.0 and refuses our older target (`version_rollback`). Both are
    `overridden`: the wave does not wait for the 60 s gateway timeout, and two of four
    (50 %) do not trip `failed_rate>20%`; the database and `fleet status` say so, and
    neither is sent anything again."""
    from edgerund.backend.rollout import spread_order

    path, _ = bundle(tmp_path, "2.1.0")
    gws = fleet(mosquitto, n=4)
    plant = [g.gateway for g in gws if g.site.startswith("plant-")]
    during, before = spread_order("ovr", plant)[1:3]  # both in wave 2 of `1,100%`
    gws = [
        FakeGateway(mosquitto, g.gateway, g.site, override="2.2.0")
        if g.gateway == during
        else FakeGateway(mosquitto, g.gateway, g.site, override="2.5.0", override_before=True)
        if g.gateway == before
        else g
        for g in gws
    ]
    async with Fleet(gws) as f:
        t0 = time.monotonic()
        rc, out, err = await cli(
            *rollout_args(mosquitto, pg_dsn, path, "ovr", **{"--waves": "1,100%"})
        )
        elapsed = time.monotonic() - t0
        assert rc == 0, out + err
        st = await status(pg_dsn, "ovr")
        await asyncio.sleep(1.0)  # nothing more may arrive
    assert elapsed < 45, elapsed  # not held for the 60 s timeout
    assert st["state"] == "succeeded" and "overridden=2" in st["reason"]
    c = st["counts"]
    assert (c["committed"], c["overridden"], c["failed"], c["timed_out"]) == (2, 2, 0, 0)
    rows = {t["gateway"]: t for t in st["targets"]}
    assert (rows[during]["status"], rows[during]["outcome"], rows[during]["reason"]) == (
        "overridden", "overridden", "twin_override",
    )  # fmt: skip
    assert rows[before]["status"] == "overridden"
    assert rows[before]["reason"] == "twin_override (version_rollback: runs 2.5.0)"
    assert f.gateways[during].version == "2.2.0" and f.gateways[before].version == "2.5.0"
    for g in (during, before):
        assert len(f.gateways[g].received) == 1  # the rollout's one document, no other
    events = [json.loads(x) for x in out.splitlines()]
    done = {e["gateway"]: e["status"] for e in events if e["event"] == "gateway"}
    assert done[during] == done[before] == "overridden"
    # the human views
    rc, out, err = await cli("status", "--postgres", pg_dsn)
    assert rc == 0 and "committed 2  failed 0  overridden 2" in out, out
    rc, out, err = await cli("status", "ovr", "--postgres", pg_dsn)
    assert rc == 0 and "overridden 2" in out
    assert f"{during:<20} overridden overridden twin_override" in out, out


async def spawn_fleet(args: list[str]) -> asyncio.subprocess.Process:
    """`edgerund fleet ARGS` as a process, its output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgerund.cli", "fleet", *args,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def killed_at_wave_2(args: list[str]) -> None:
    """Run `fleet` with `args` and SIGKILL it (no clean-up) once wave 2 has started."""
    p = await spawn_fleet(args)
    assert p.stdout is not None
    async with asyncio.timeout(90):
        while True:
            line = await p.stdout.readline()
            assert line, (await p.stderr.read()).decode() if p.stderr else ""
            ev = json.loads(line)
            if ev["event"] == "wave_started" and ev["wave"] == 2:
                break
    p.send_signal(signal.SIGKILL)
    await p.wait()


async def test_killed_tool_resumes_from_the_database_without_retargeting(
    mosquitto: Any, pg_dsn: str, tmp_path: Path
) -> None:
    path, _ = bundle(tmp_path, "2.1.0")
    async with Fleet(fleet(mosquitto, delay_s=0.5)) as f:
        args = rollout_args(mosquitto, pg_dsn, path, "kill", **{"--soak": "2s"})
        # kill it (SIGKILL: no clean-up) once wave 2 is out and wave 1 committed
        await killed_at_wave_2(args)
        before = await status(pg_dsn, "kill")
        assert before["state"] == "running" and before["wave"] == 2
        committed_before = {t["gateway"] for t in before["targets"] if t["status"] == "committed"}
        assert len(committed_before) == 1
        counts_before = {n: len(g.received) for n, g in f.gateways.items()}
        rc, out, err = await cli("resume", "kill", "--key", str(OPERATOR_KEY), "--postgres",
                                 pg_dsn, "--json", *broker_args(mosquitto))  # fmt: skip
        assert rc == 0, out + err
        after = await status(pg_dsn, "kill")
    assert after["state"] == "succeeded" and after["counts"]["committed"] == 10
    resumed = json.loads(out.splitlines()[0])
    assert resumed["event"] == "resumed"
    for name in committed_before:  # done before the kill: nothing sent again
        assert len(f.gateways[name].received) == counts_before[name] == 1
    for name, g in f.gateways.items():
        if name != "lab-01":
            assert len({d["version"] for d in g.docs()}) == 1, name  # one desired version
            assert g.outcome["outcome"] == "applied"  # never a replay refusal


async def test_resume_re_signs_a_stored_document_that_expired_meanwhile(
    mosquitto: Any, pg_dsn: str, tmp_path: Path
) -> None:
    # The tool died between the database write and the publish, and was resumed after the
    # stored document's 7 days: re-sending the same bytes would be refused as `expired`.
    from edgerund.backend.rollout import spread_order

    path, _ = bundle(tmp_path, "2.1.0")
    gws = fleet(mosquitto, n=6)
    plant = [g.gateway for g in gws if g.site.startswith("plant-")]
    late = spread_order("exp", plant)[-1]  # in wave 2, never the single gateway of wave 1
    async with Fleet(gws) as f:
        g = f.gateways[late]
        task = f.tasks[list(f.gateways).index(late)]
        task.cancel()  # offline: selected by its retained report, it receives nothing
        with contextlib.suppress(asyncio.CancelledError):
            await task
        args = rollout_args(
            mosquitto, pg_dsn, path, "exp", **{"--waves": "1,100%", "--gateway-timeout": "20s"}
        )
        await killed_at_wave_2(args)
        # as if the tool had died before publishing, a week ago: the broker holds nothing
        # for the late gateway, and its stored document has expired
        with psycopg.connect(pg_dsn) as c:
            v, raw = c.execute(
                "SELECT desired_version, desired_doc FROM rollout_targets "
                "WHERE rollout = 'exp' AND gateway = %s AND status = 'sent'", (late,),
            ).fetchone()  # fmt: skip
            signed = json.loads(bytes(raw))["signed"]
            expired = T.desired(late, v, signed["config"], OPERATOR,
                                models=signed["models"], expires_s=-60.0)  # fmt: skip
            c.execute(
                "UPDATE rollout_targets SET desired_doc = %s WHERE rollout = 'exp' "
                "AND gateway = %s", (expired, late),
            )  # fmt: skip
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
            await c.publish(f"{g.base}/desired", b"", qos=1, retain=True)
        f.tasks.append(asyncio.create_task(g.run()))  # back online
        rc, out, err = await cli("resume", "exp", "--key", str(OPERATOR_KEY), "--postgres",
                                 pg_dsn, "--json", *broker_args(mosquitto))  # fmt: skip
        assert rc == 0, out + err
        after = await status(pg_dsn, "exp")
    events = [json.loads(x) for x in out.splitlines()]
    resigned = [e for e in events if e["event"] == "resigned"]
    assert [(e["gateway"], e["was"]) for e in resigned] == [(late, v)], events
    assert resigned[0]["version"] > v
    assert g.outcome["outcome"] == "applied", g.outcome  # not refused as expired
    last = g.docs()[-1]
    assert last["version"] == resigned[0]["version"] and last["expires"] > time.time() * 1000
    assert last["models"] == signed["models"] and last["config"] == signed["config"]
    row = {t["gateway"]: t for t in after["targets"]}[late]
    assert row["status"] == "committed", row
    assert after["state"] == "succeeded"


async def test_abort_with_revert_and_the_device_view(
    mosquitto: Any, pg_dsn: str, tmp_path: Path
) -> None:
    path, _ = bundle(tmp_path, "2.1.0")
    gws = fleet(mosquitto, n=4)
    old = {"version": "2.0.0", "sha256": "cd" * 32, "size": 7}
    prev = T.desired("gw-00", 2, {}, OPERATOR, models={"motor-ae": old})
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
        await c.publish("twin/v1/plant-a/gw-00/desired", prev, qos=1, retain=True)
    async with Fleet(gws) as f:
        f.gateways["gw-00"].targets["motor-ae"] = {
            **old,
            "desired_version": 2,
            "state": "committed",
        }
        args = rollout_args(mosquitto, pg_dsn, path, "ab", **{"--soak": "1h", "--waves": "2,100%"})
        p = await spawn_fleet(args)
        assert p.stdout is not None
        async with asyncio.timeout(90):
            while json.loads(await p.stdout.readline())["event"] != "wave_done":
                pass
        # a second rollout of the model may not take gateways the first one holds
        rc, out, err = await cli(*rollout_args(mosquitto, pg_dsn, path, "ab2"))
        assert rc == 1 and "another rollout of this model is in progress" in err, out + err
        assert "(ab)" in err
        rc, out, err = await cli("abort", "ab", "--revert", "--key", str(OPERATOR_KEY),
                                 "--postgres", pg_dsn, "--json", *broker_args(mosquitto))  # fmt: skip
        assert rc == 0, err
        assert await asyncio.wait_for(p.wait(), 30) == 1  # the driver noticed and stopped
        st = await status(pg_dsn, "ab")
        reached = {t["gateway"] for t in st["targets"] if t["status"] != "pending"}
        assert st["state"] == "aborted" and len(reached) == 2
        reverted = {
            e["gateway"]: e for e in map(json.loads, out.splitlines()) if e["event"] == "reverted"
        }
        assert set(reverted) == reached
        await asyncio.sleep(1.0)
        for name in reached:
            last = f.gateways[name].docs()[-1]
            if name == "gw-00":
                assert last["models"]["motor-ae"] == old  # its previous target, back
            else:
                assert "motor-ae" not in last["models"] and "note" in reverted[name]
        untouched = set(f.gateways) - reached
        assert all(not f.gateways[n].received for n in untouched if n != "gw-00")

        rc, out, err = await cli("devices", "--select", "site=plant-a", "--json",
                                 "--discover-s", "3", "--postgres", pg_dsn,
                                 *broker_args(mosquitto))  # fmt: skip
        assert rc == 0, err
        rows = json.loads(out)["devices"]
        assert sorted(r["gateway"] for r in rows) == ["gw-00", "gw-02"]
        row = rows[0]
        assert row["backlog_batches"] == 3 and row["health"]["ok"] is True
        assert row["models"][0]["name"] == "motor-ae" and row["last_seen_s"] < 600
        rc, out, _ = await cli("devices", *broker_args(mosquitto), "--discover-s", "3")
        assert rc == 0 and "lab-01" in out and "gateway" in out.splitlines()[0]
    with psycopg.connect(pg_dsn) as c:
        (n,) = c.execute("SELECT count(*) FROM twins WHERE reported IS NOT NULL").fetchone()
        assert n >= 2


def test_schema_version_1_database_is_migrated_and_a_newer_one_refused(pg_dsn: str) -> None:
    from edgerund.backend import pgsink

    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(pgsink.TELEMETRY_SCHEMA)
        c.execute("INSERT INTO edgerund_schema VALUES ('telemetry', 1)")
        assert c.execute("SELECT to_regclass('rollouts')").fetchone()[0] is None
        pgsink.ensure_schema(c)
        assert c.execute("SELECT to_regclass('rollout_targets')").fetchone()[0] is not None
        (v,) = c.execute("SELECT version FROM edgerund_schema").fetchone()
        assert v == pgsink.SCHEMA_VERSION == 2
        c.execute("UPDATE edgerund_schema SET version = 3")
        with pytest.raises(RuntimeError, match="version 3"):
            pgsink.ensure_schema(c)


def test_gateway_keys_refuse_forged_reported_states(tmp_path: Path) -> None:
    """With --gateway-keys, a reported document counts only with its gateway's signature:
    a forged `committed` (unsigned, or signed by another key) is not taken."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edgerund.backend.rollout_run import TwinCache
    from edgerund.twin.auth import reported_message

    gw_key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "gw-01.pem").write_bytes(
        gw_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    signed = FakeGateway(None, "gw-01", "plant-a").reported()

    def doc(key: Any, body: dict[str, Any]) -> bytes:
        sig = key.sign(reported_message(body), ec.ECDSA(hashes.SHA256()))
        return json.dumps(
            {"signed": body, "key_id": "k", "sig": base64.b64encode(sig).decode()}
        ).encode()

    cache = TwinCache(None, keys_dir=tmp_path)  # type: ignore[arg-type]
    topic = "twin/v1/plant-a/gw-01/reported"
    cache.take(topic, doc(gw_key, signed))
    assert cache.reported["gw-01"]["seq"] == signed["seq"]
    forged = {**signed, "seq": 99, "desired": {"version": 7, "models": {"motor-ae": {
        "version": "2.1.0", "desired_version": 7, "state": "committed"}}}}  # fmt: skip
    cache.take(topic, doc(other, forged))
    cache.take(topic, json.dumps({"signed": forged, "key_id": "k", "sig": ""}).encode())
    assert cache.reported["gw-01"]["seq"] == signed["seq"]  # the forgeries changed nothing
    assert "does not verify" in cache.refused["gw-01"]
    cache.take("twin/v1/plant-a/gw-02/reported", doc(gw_key, {**signed, "gateway": "gw-02"}))
    assert "gw-02" not in cache.reported and "no public key" in cache.refused["gw-02"]
    # without keys, the same forgery would have been taken: the defence is what refused it
    open_cache = TwinCache(None)  # type: ignore[arg-type]
    open_cache.take(topic, doc(other, forged))
    assert open_cache.reported["gw-01"]["seq"] == 99


async def test_broker_outage_mid_rollout_is_ridden_out(
    mosquitto: Any, pg_dsn: str, tmp_path: Path
) -> None:
    """The broker restarts during a soak: the tool reconnects, resumes from the database and
    finishes; no gateway is timed out or targeted twice."""
    path, _ = bundle(tmp_path, "2.1.0")
    async with Fleet(fleet(mosquitto, n=4)) as f:
        args = rollout_args(
            mosquitto, pg_dsn, path, "outage", **{"--soak": "3s", "--waves": "1,100%"}
        )
        p = await spawn_fleet(args)
        assert p.stdout is not None
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(60):
            while not events or events[-1]["event"] != "wave_done":
                events.append(json.loads(await p.stdout.readline()))
        await asyncio.to_thread(mosquitto.stop)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(mosquitto.start)
        out, err = await asyncio.wait_for(p.communicate(), 120)
        events += [json.loads(x) for x in out.decode().splitlines()]
        assert p.returncode == 0, (events, err.decode()[-2000:])
        st = await status(pg_dsn, "outage")
    kinds = [e["event"] for e in events]
    assert "broker_lost" in kinds and "resumed" in kinds and kinds[-1] == "succeeded"
    assert st["counts"]["committed"] == 4 and st["counts"]["timed_out"] == 0
    for name, g in f.gateways.items():
        if name != "lab-01":
            assert len({d["version"] for d in g.docs()}) == 1 and g.version == "2.1.0"
