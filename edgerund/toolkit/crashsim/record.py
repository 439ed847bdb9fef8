"""Record the two scenarios under strace (I/O: processes, files).

update: the real daemon (`edgerund run`, the shipped reference model, the development
    keyring) starts on an empty state directory (it seeds slot `a`), receives a signed
    bundle whose golden vectors do not match (staged, precheck fails, REJECTED), then one
    the daemon swaps in and its probation rolls back by itself (`probation_score`: the
    live scores leave the bundle's signed range), then a good one over the diagnostics
    socket with `wait: commit` (stage, precheck, trial,
    probation, commit), is rolled back by hand (`rollback`), and is stopped. The driver
    opens `/__crashsim__/rejected` once the bad bundle was refused, `.../probation_sent`
    before it sends the probation-failing one, `.../auto_rolled_back` once the daemon
    answered that it rolled back, `.../update_sent`
    before it sends the good one, `.../committed` once the daemon answered COMMITTED,
    `.../rollback_requested` before it sends `rollback` and `.../rolled_back` once it was
    answered, so the trace says which model must survive a power cut where.
spool: the daemon's Spool (telemetry/spool.py: SQLite WAL, synchronous=FULL, grouped
    commits) on an empty directory appends batches (urgent ones alone, others grouped)
    and acknowledges a few; after each append future resolved the driver opens
    `/__crashsim__/append-<seq>`: from there on that batch must survive.

Both drivers run as `python -m edgerund.toolkit.crashsim.record {update-run|spool-run}`
inside `strace -f` (trace.strace_argv), so the daemon, its threads and children are
traced in one ordered log.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerund.toolkit.crashsim import fsmodel, trace
from edgerund.toolkit.crashsim.fsmodel import MARKER_DIR, Op, Snapshot

REPO = Path(__file__).resolve().parents[3]
REF = REPO / "models" / "reference"
DEV = REPO / "models" / "dev-keys"
MODEL = "motor-ae"
NEW_VERSION = "2.1.0"
NEW_COUNTER = 2
PROBATION_VERSION = "2.0.10"
SPOOL_TTL = {0: 1e9, 1: 1e9, 2: 1e9}


@dataclass
class Recording:
    root: Path
    initial: Snapshot
    ops: list[Op]
    markers: list[tuple[str, int]]
    skipped: list[str]
    seconds: float


def _marker(name: str) -> None:
    """A failing open the trace records in order with the daemon's own syscalls."""
    try:
        os.close(os.open(MARKER_DIR + name, os.O_RDONLY))
    except OSError:
        pass


def _record(root: Path, argv: list[str], trace_path: Path, timeout_s: float) -> Recording:
    initial = fsmodel.snapshot_dir(root)
    t0 = time.monotonic()
    cmd = [*trace.strace_argv(str(trace_path)), sys.executable, "-m", __name__, *argv]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError(
            f"recording {argv[0]} failed ({res.returncode}):\n{res.stdout.decode()[-3000:]}"
            f"\n{res.stderr.decode()[-3000:]}"
        )
    rec = fsmodel.Recorder(root, initial)
    with open(trace_path, encoding="latin-1") as fh:
        rec.feed(trace.parse(fh))
    return Recording(root, initial, rec.ops, rec.markers, rec.skipped, time.monotonic() - t0)


# -- update ------------------------------------------------------------------------------------


def update_overrides() -> dict[str, Any]:
    return {
        "models": [{"name": MODEL, "path": str(REF)}],
        "updates": {
            "enabled": True,
            "keyring_file": str(DEV / "keyring.dev.json"),
            "probation_s": 0.5,
            "precheck_runs": 20,
        },
    }


def simulated_update_overrides() -> dict[str, Any]:
    """The recorded run: the simulator's sensors and its `motor` loop running the model
    (a probation judges the live scores of a model a loop runs), with the update scenario's
    models and updates sections. Under strace the loop misses ticks by the hundred and
    inferences overrun their deadline (model faults), so probation judges neither here:
    the score range is what fails."""
    import yaml

    from edgerund.config.loader import simulate_config_path
    from edgerund.toolkit.daemonproc import merge

    sim = yaml.safe_load(simulate_config_path().read_text())
    for own in ("paths", "diag", "logging"):  # DaemonProc's, under the work directory
        sim.pop(own, None)
    over = merge(sim, update_overrides())
    over["updates"]["probation"] = {"max_missed_ticks": 1_000_000, "max_faults": 1_000_000}
    return over


def build_bundle(out: Path) -> dict[str, str]:
    """The signed bundle of the update scenario; returns its signed file hashes."""
    from edgerund.publisher import build as B

    B.build_from_dir(
        REF,
        out,
        [B.load_private(DEV / "DEVELOPMENT-ONLY.key")],
        version=NEW_VERSION,
        security_counter=NEW_COUNTER,
        exclude=("model_fp32.onnx",),
        health={"probation_s": 0.5},
    )
    return signed_hashes(out)


def build_bad_bundle(work: Path, out: Path) -> None:
    """A correctly signed bundle whose golden vectors do not match its model: the daemon
    stages it, the precheck fails (golden_mismatch) and it is REJECTED, its slot
    invalidated: the stage-then-reject path."""
    import numpy as np

    from edgerund.publisher import build as B

    model = (REF / "model.onnx").read_bytes()
    inputs = B._golden_inputs(model, REF / "golden.npz")
    buf = io.BytesIO(B.make_golden(model, inputs=inputs))
    arrays = dict(np.load(buf, allow_pickle=False))
    for k in list(arrays):
        if k.startswith("out."):
            arrays[k] = arrays[k] + 1.0
    golden = work / "bad-golden-io.npz"
    with open(golden, "wb") as fh:
        np.savez(fh, **arrays)
    B.build_from_dir(
        REF,
        out,
        [B.load_private(DEV / "DEVELOPMENT-ONLY.key")],
        version="2.0.9",
        security_counter=1,
        exclude=("model_fp32.onnx",),
        health={"probation_s": 0.5},
        golden=golden,
    )


def build_probation_bundle(out: Path) -> dict[str, str]:
    """A correctly signed bundle of the reference model that passes its precheck (the
    golden vectors match) but whose signed health range no live score meets: the daemon
    swaps it in, probation fails (probation_score) and the daemon rolls back BY ITSELF.
    Returns its signed file hashes (the slot a power cut in its trial may resume)."""
    from edgerund.publisher import build as B

    B.build_from_dir(
        REF,
        out,
        [B.load_private(DEV / "DEVELOPMENT-ONLY.key")],
        version=PROBATION_VERSION,
        security_counter=1,
        exclude=("model_fp32.onnx",),
        health={"probation_s": 3.0, "score_min": 1e6},
    )
    return signed_hashes(out)


def signed_hashes(bundle: Path) -> dict[str, str]:
    with tarfile.open(bundle) as tf:
        member = tf.extractfile("manifest.json")
        assert member is not None
        man = json.loads(member.read())
    return {f["path"]: f["sha256"] for f in man["files"]}


def shipped_version() -> str:
    return str(json.loads((REF / "manifest.json").read_text())["version"])


def shipped_hashes() -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in REF.iterdir() if p.is_file()
    }


def record_update(
    work: Path, timeout_s: float = 600.0
) -> tuple[Recording, dict[str, str], dict[str, str]]:
    """The recording, the good bundle's signed file hashes and the probation-failing
    bundle's."""
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "update.bundle"
    new_files = build_bundle(bundle)
    bad = work / "bad.bundle"
    build_bad_bundle(work, bad)
    trial = work / "probation.bundle"
    trial_files = build_probation_bundle(trial)
    state = work / "state"
    state.mkdir()
    rec = _record(
        state,
        ["update-run", str(work), str(bundle), str(bad), str(trial)],
        work / "update.strace",
        timeout_s,
    )
    return rec, new_files, trial_files


def _refused(d: Any, bundle: Path, code: str) -> None:
    """Send `bundle` and require the daemon to refuse it with `code`."""
    from edgerund.errors import CommandError

    try:
        res = d.call("update", {"path": str(bundle), "wait": "commit"}, timeout_s=400)
    except CommandError as exc:
        if exc.code != code:
            raise SystemExit(f"{bundle.name} refused for {exc.code}, not {code}") from exc
        return
    raise SystemExit(f"{bundle.name} was not refused ({code} expected): {res}")


def _update_run(work: Path, bundle: Path, bad: Path, trial: Path) -> None:
    from edgerund.toolkit.daemonproc import DaemonProc

    d = DaemonProc(work, simulated_update_overrides(), simulate=True)
    d.start()
    try:
        d.wait_ready(240)
        # First a bundle the precheck rejects after staging; from its answer until the
        # next update is sent, the old model.
        _refused(d, bad, "golden_mismatch")
        _marker("rejected")
        # Then one that runs and fails its probation: the daemon's own rollback; from its
        # answer until the next update is sent, the old model.
        _marker("probation_sent")
        _refused(d, trial, "probation_score")
        _marker("auto_rolled_back")
        _marker("update_sent")
        res = d.call("update", {"path": str(bundle), "wait": "commit"}, timeout_s=400)
        if res.get("state") != "COMMITTED":
            raise SystemExit(f"update did not commit: {res}")
        _marker("committed")
        # Then the technician's manual rollback: from its answer on, the old model.
        _marker("rollback_requested")
        res = d.call("rollback", {"model": MODEL}, timeout_s=120)
        if res.get("active_slot") != "a":
            raise SystemExit(f"rollback did not return to slot a: {res}")
        _marker("rolled_back")
    finally:
        d.stop()


# -- spool ---------------------------------------------------------------------------------------


def record_spool(work: Path, batches: int = 12, timeout_s: float = 300.0) -> Recording:
    work.mkdir(parents=True, exist_ok=True)
    root = work / "state"  # the spool directory itself is created by the spool's open
    root.mkdir()
    return _record(
        root, ["spool-run", str(root / "spool"), str(batches)], work / "spool.strace", timeout_s
    )


def spool_open_args() -> dict[str, Any]:
    from edgerund.telemetry.codec import Cls

    return {
        "max_bytes": 8 << 20,
        "ttl_s": {Cls(k): v for k, v in SPOOL_TTL.items()},
        "commit_interval_s": 0.05,
    }


def _spool_run(root: Path, batches: int) -> None:
    import numpy as np

    from edgerund.telemetry.codec import Cls, SeriesBlock
    from edgerund.telemetry.spool import Spool

    sp = Spool(root, **spool_open_args())
    sp.open()
    t0 = 1_767_225_600_000
    seqs: list[int] = []
    try:
        i = 0
        while i < batches:
            # A group of two ordinary appends (one commit), then one urgent one alone.
            futs = []
            for _ in range(2 if i % 3 == 0 else 1):
                t = np.arange(50, dtype=np.int64) * 20 + t0 + i * 1000
                vals = (np.arange(50, dtype=np.int64) * (i + 1)) % 977
                urgent = i % 3 == 2
                futs.append(
                    sp.append(
                        Cls.EVT if urgent else Cls.RAW,
                        [SeriesBlock(1 + i % 3, t, (vals,), (-2,))],
                        1,
                        urgent=urgent,
                    )
                )
                i += 1
            for f in futs:
                seq = f.result(timeout=30)
                seqs.append(seq)
                _marker(f"append-{seq}")
            if len(seqs) >= 4 and len(seqs) % 4 == 0:
                sp.ack(seqs[-4:-2]).result(timeout=30)
        sp.flush().result(timeout=30)
    finally:
        sp.close()


def spool_rows(db: Path) -> dict[int, str]:
    """seq -> sha256 of the payload, read directly (harness side)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            int(s): hashlib.sha256(p).hexdigest()
            for s, p in conn.execute("SELECT seq, payload FROM batches")
        }
    finally:
        conn.close()


# -- directories (regression of the lost `models/` directory) ------------------------------------


def record_dirs(work: Path, durable: bool) -> Recording:
    """A file written atomically into directories created just before: with
    `fsutil.make_dirs` (durable) or a plain `mkdir -p` (what the slot store, the counter
    and the spool did before the crash check found it)."""
    work.mkdir(parents=True, exist_ok=True)
    root = work / "state"
    root.mkdir()
    mode = "durable" if durable else "plain"
    return _record(root, ["dirs-run", str(root), mode], work / f"dirs-{mode}.strace", 60)


def _dirs_run(root: Path, mode: str) -> None:
    from edgerund.updates import fsutil

    d = root / "models" / "m1"
    if mode == "durable":
        fsutil.make_dirs(d)
    else:
        d.mkdir(parents=True)
    fsutil.atomic_write(d / "state.json", b'{"state": "COMMITTED"}')
    _marker("written")


def main(argv: list[str]) -> int:
    if argv[0] == "dirs-run":
        _dirs_run(Path(argv[1]), argv[2])
    elif argv[0] == "update-run":
        _update_run(Path(argv[1]), Path(argv[2]), Path(argv[3]), Path(argv[4]))
    elif argv[0] == "spool-run":
        _spool_run(Path(argv[1]), int(argv[2]))
    else:
        print(f"unknown scenario {argv[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.stdout = io.TextIOWrapper(sys.stdout.buffer, line_buffering=True)
    raise SystemExit(main(sys.argv[1:]))
