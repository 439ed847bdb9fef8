"""The soak rig: the real peers a soak run drives (mosquitto, the link proxy, swtpm, the
independent telemetry consumer, the bundles) and the daemon as systemd would run it.

Everything here is I/O; the fault schedule (schedule.py) and the invariant arithmetic
(invariants.py) are pure. The consumer is edgerund/backend/consumer.py, run in this
(harness) process on its own thread and subscribed to mosquitto directly (never through
the proxy the daemon's link goes through), so what it counts is independent of the
daemon's own counters.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.peers.binaries import find_binary
from benchmarks.peers.mosquitto import Broker
from benchmarks.peers.swtpm import SWTPM_HINT, SwtpmProcess, provision_state
from benchmarks.soak.daemonproc import REPO, SupervisedDaemon
from benchmarks.soak.linkproxy import LinkProxy
from edgerund.backend import consumer as consumer_mod
from edgerund.publisher.build import load_private
from edgerund.toolkit.daemonproc import merge

DEV_KEY = REPO / "models" / "dev-keys" / "DEVELOPMENT-ONLY.key"
OPERATOR_KEY = REPO / "models" / "dev-keys" / "OPERATOR-DEVELOPMENT-ONLY.key"
MODEL_DIR = REPO / "models" / "reference"
SHIPPED_VERSION = "2.0.0"


class CollectingSink:
    """A consumer sink that keeps only what the invariants need: loss records."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.losses: list[dict[str, Any]] = []
        self.resends: list[dict[str, Any]] = []  # the consumer's cmd/resend requests
        self.records = 0
        self.bad_timestamps: list[dict[str, Any]] = []
        self.max_future_skew_s = float("-inf")

    def write(self, records: list[dict[str, Any]]) -> None:
        now_ms = time.time() * 1000  # the harness's (real) wall clock
        with self.lock:
            self.records += len(records)
            for r in records:
                t = r.get("t_ms")
                if r.get("type") == "series" and isinstance(t, list) and t:
                    # sane timestamps across NTP steps: ordered within a batch, and between
                    # 2020 and 30 days ahead of the real clock (steps are -2 h .. +1 day)
                    skew = (max(t) - now_ms) / 1000
                    self.max_future_skew_s = max(self.max_future_skew_s, skew)
                    if any(b < a for a, b in itertools.pairwise(t)) or not (
                        1_577_836_800_000 <= min(t) and skew <= 30 * 86400
                    ):
                        self.bad_timestamps.append(
                            {
                                "epoch": r.get("epoch"),
                                "seq": r.get("seq"),
                                "series": r.get("name"),
                                "t_first": t[0],
                                "t_last": t[-1],
                            }
                        )
                if r.get("type") == "resend_requested":
                    self.resends.append(
                        {k: r.get(k) for k in ("epoch", "from_seq", "to_seq")} | {"t": time.time()}
                    )
                if r.get("type") == "loss":
                    self.losses.append(
                        {
                            k: r.get(k)
                            for k in ("epoch", "seq", "reason", "loss_cls", "n_samples", "seqs")
                        }
                    )

    def close(self) -> None:
        pass


class ConsumerThread:
    def __init__(self, port: int) -> None:
        self.port = port
        self.consumer = consumer_mod.Consumer()
        self.sink = CollectingSink()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="soak-consumer")
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            ready = asyncio.Event()

            async def flag() -> None:
                await ready.wait()
                self._ready.set()

            asyncio.get_running_loop().create_task(flag())
            await consumer_mod.run(
                self.consumer,
                self.sink,  # type: ignore[arg-type]  # duck-typed sink
                host="127.0.0.1",
                port=self.port,
                group="soak",
                client_id="soak-consumer",
                stop=self._stop,
                ready=ready,
                resend_after_s=20.0,
                # the gateway runs cmd/resend only when an operator signed it
                command_key=load_private(OPERATOR_KEY),
            )

        self._loop.run_until_complete(main())

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("the soak consumer did not subscribe within 20 s")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def seen(self) -> dict[int, list[tuple[int, int]]]:
        """Seqs received per spool epoch (as ranges); read under the GIL, copies only."""
        out: dict[int, list[tuple[int, int]]] = {}
        for (_gw, epoch), tr in list(self.consumer.trackers.items()):
            out[epoch] = tr.seen.ranges()
        return out


def make_bundles(out: Path, good: int, *, fresh_key: Path) -> dict[str, Any]:
    """Signed bundles for the run: `good` successive versions (2.0.N, counter N+1) and the
    bad variants. Returns {"good": [(version, path)], "bad": {variant: (version, path)}}."""
    from edgerund.publisher import build as pub
    from edgerund.publisher.build import load_private

    out.mkdir(parents=True, exist_ok=True)
    dev = load_private(DEV_KEY)
    goods: list[tuple[str, str]] = []
    golden = None
    for i in range(good):
        ver = f"2.0.{i + 1}"
        p = out / f"good-{ver}.bundle"
        pub.build_from_dir(
            MODEL_DIR, p, [dev], version=ver, security_counter=i + 2, exclude=["model_fp32.onnx"]
        )
        goods.append((ver, str(p)))
        golden = p
    bad: dict[str, tuple[str, str]] = {}
    # a properly signed, older version: must fail anti-rollback
    p = out / "bad-rollback.bundle"
    pub.build_from_dir(
        MODEL_DIR, p, [dev], version="1.0.0", security_counter=1, exclude=["model_fp32.onnx"]
    )
    bad["version_rollback"] = ("1.0.0", str(p))
    # a key not in the keyring
    fresh_key.parent.mkdir(parents=True, exist_ok=True)
    fresh_key, _pub, _kid = pub.keygen(fresh_key.parent, fresh_key.stem)
    p = out / "bad-wrongkey.bundle"
    pub.build_from_dir(
        MODEL_DIR,
        p,
        [load_private(fresh_key)],
        version="9.9.1",
        security_counter=40,
        exclude=["model_fp32.onnx"],
    )
    bad["wrong_key"] = ("9.9.1", str(p))
    # a good bundle with one byte of its signature flipped
    p = out / "bad-signature.bundle"
    pub.build_from_dir(
        MODEL_DIR, p, [dev], version="9.9.2", security_counter=41, exclude=["model_fp32.onnx"]
    )
    data = bytearray(p.read_bytes())
    i = data.find(b'"sig"')
    if i < 0:
        i = data.find(b"manifest.sig") + 600
    data[i + 12] ^= 0x01
    p.write_bytes(bytes(data))
    bad["bad_signature"] = ("9.9.2", str(p))
    # truncated in the middle of the model
    p = out / "bad-truncated.bundle"
    src = Path(golden) if golden else Path(bad["wrong_key"][1])
    p.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    bad["truncated"] = ("9.9.3", str(p))
    return {"good": goods, "bad": bad}


class Rig:
    """The peers of one soak run, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.broker = Broker(
            find_binary("mosquitto", "apt-get install -y mosquitto"), root / "mosquitto"
        )
        self.broker.workdir.mkdir(parents=True, exist_ok=True)
        self.swtpm: SwtpmProcess | None = None
        self.proxy: LinkProxy | None = None
        self.consumer: ConsumerThread | None = None
        self.daemon: SupervisedDaemon | None = None
        self.actuator_log = root / "actuator.jsonl"
        self.valid_config_text = ""

    def start_peers(self) -> None:
        self.broker.start()
        state = self.root / "swtpm-state"
        provision_state(state, self.root / "swtpm-setup")
        self.swtpm = SwtpmProcess(find_binary("swtpm", SWTPM_HINT), state, self.root / "swtpm.log")
        self.swtpm.start()
        self.proxy = LinkProxy(self.broker.port)
        self.proxy.start()
        self.consumer = ConsumerThread(self.broker.port)
        self.consumer.start()

    def daemon_config(self) -> dict[str, Any]:
        from edgerund.config.loader import simulate_config_path

        assert self.swtpm is not None and self.proxy is not None
        cfg = yaml.safe_load(simulate_config_path().read_text())
        d = self.root / "daemon"
        cfg["paths"] = {"state_dir": str(d / "state"), "run_dir": str(d / "run")}
        cfg["diag"] = {"socket": str(d / "diag.sock"), "mode": 0o666}
        cfg.setdefault("logging", {})["format"] = "json"
        over: dict[str, Any] = {
            "identity": {"kind": "tpm", "tcti": self.swtpm.tcti, "fallback": "none"},
            "telemetry": {
                # small cap: a long outage fills it, eviction writes loss records
                "spool_max_mb": 0.25,
                "keep_acked_h": 0.02,  # delivered rows go after ~72 s: the cap bites sooner
                "batch_max_age_s": 5.0,
                "agg_interval_s": 10.0,
                "commit_interval_ms": 500,
                "series": [
                    {"match": "motor_vib.*", "raw": True},
                    {"match": "battery.*", "raw": True},
                ],
            },
            "uplink": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": self.proxy.port,
                "keepalive_s": 10,
                "connect_timeout_s": 5.0,
                "ack_timeout_s": 15.0,
                "backoff_initial_s": 0.5,
                "backoff_max_s": 5.0,
                "replay_bytes_per_s": 65536,
            },
            "updates": {"probation_s": 8},
        }
        cfg = merge(cfg, over)
        for loop in cfg["loops"]:
            act = loop.get("actuator") or {}
            if act.get("driver") == "emulated":
                act["record_path"] = str(self.actuator_log)
        return cfg

    def make_daemon(self) -> SupervisedDaemon:
        cfg = self.daemon_config()
        d = self.root / "daemon"
        d.mkdir(parents=True, exist_ok=True)
        self.valid_config_text = yaml.safe_dump(cfg, sort_keys=False)
        self.daemon = SupervisedDaemon(d, self.valid_config_text, env={"EDGERUND_TEST_HOOKS": "1"})
        self.daemon.config = cfg
        return self.daemon

    @property
    def spool_dir(self) -> Path:
        return self.root / "daemon" / "state" / "telemetry"

    def stop_all(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(20)
        if self.consumer is not None:
            self.consumer.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.swtpm is not None:
            self.swtpm.kill()
        self.broker.stop()


def cleanup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)


def dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
