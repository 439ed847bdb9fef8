"""Benchmark: the attack list of issue #12 fed to the RUNNING daemon while its 100 Hz
control loop runs, plus the power-cut check and the forged-quote count.

    python benchmarks/attacks.py [--crash-limit N] [--skip-crash]

What runs:
  1. `edgerund run --simulate` (the shipped simulated plant: real drivers on emulated
     devices, the reference model in the 100 Hz `motor` loop) with a keyring of three
     publisher keys (threshold 2) made for this run and a security counter of 5.
  2. Malicious bundles, the kinds of tests/updates/test_attacks.py built here again from the
     shipped reference model (traversal, absolute path, links, device, swapped/mixed
     payloads, missing/extra files, unsigned, wrong key, threshold, duplicate signer,
     expiry, counter rollback, fast-forward, version rollback, replay, pax size, pax flood
     (CVE-2024-6232 shape), GNU longname, endless member, oversized, FIFO, wrong hardware,
     unknown model, manifest not first, keyring rollback/jump), each sent with `update`
     (wait: commit) over the diagnostics socket. Refused = the daemon answered an error and
     the active slot and version are unchanged.
  3. Diagnostics-socket attacks: 20,000 nested `[`, an oversized line, malformed JSON, and
     60 idle connections held open while a fresh client asks for `status`.
  4. Loop figures over the attack window: missed ticks (exact: the counter's delta) and the
     loop's tick lateness max. The daemon keeps a cumulative histogram, so the max during
     the attacks is exact when it rose during them; otherwise the attacks stayed under the
     max seen before them (both are printed).
  5. The power-cut check (edgerund/toolkit/crashsim, all distinct crash states unless
     --crash-limit) and `forged_quotes_accepted` (edgerund/backend/forgeries.py: every
     forgery, against a verifier that pinned the running daemon's AK, with one genuine
     result of that AK to replay or alter).

Ends with one JSON line of all figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from edgerund.ctl.client import DiagClient  # noqa: E402
from edgerund.errors import CommandError  # noqa: E402
from edgerund.publisher import build as B  # noqa: E402
from edgerund.toolkit.daemonproc import DaemonProc  # noqa: E402
from edgerund.updates.config import UpdatesConfig  # noqa: E402

REF = REPO / "models" / "reference"
MODEL = "motor-ae"
STORED_COUNTER = 5


# -- bundles ------------------------------------------------------------------------------


class Kit:
    """The publisher side: keys, the genuine files of the reference model, and helpers to
    sign or break them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.keys = [Ed25519PrivateKey.generate() for _ in range(3)]
        self.keyring_doc = B.make_keyring(
            [k.public_key() for k in self.keys], threshold=2, version=1, signers=self.keys[:2]
        )
        self.keyring_path = work / "keyring.json"
        self.keyring_path.write_bytes(B.keyring_bytes(self.keyring_doc))
        genuine = work / "genuine.bundle"
        self.man = B.build_from_dir(
            REF, genuine, self.keys[:2], version="2.1.0", security_counter=6,
            exclude=("model_fp32.onnx",),
        )  # fmt: skip
        with tarfile.open(genuine) as tf:
            self.files = {
                m.name: tf.extractfile(m).read()  # type: ignore[union-attr]
                for m in tf.getmembers()
                if m.name not in ("manifest.json", "manifest.sig")
            }
        self.n = 0

    def out(self) -> Path:
        self.n += 1
        return self.work / f"attack-{self.n:02d}.bundle"

    def manifest(self, files: dict[str, bytes] | None = None, **kw: Any) -> dict[str, Any]:
        files = files if files is not None else self.files
        base = {
            "model_name": MODEL,
            "version": "2.1.0",
            "security_counter": STORED_COUNTER + 1,
            "files": files,
            "io_signature": self.man["io_signature"],
            "health": self.man["health"],
            "model_manifest": self.man.get("model_manifest"),
            "opset_range": (
                self.man["compatibility"]["opset_min"],
                self.man["compatibility"]["opset_max"],
            ),
        }
        base.update(kw)
        return B.make_manifest(**base)

    def bundle(
        self,
        files: dict[str, bytes] | None = None,
        signers: list[Ed25519PrivateKey] | None = None,
        **kw: Any,
    ) -> Path:
        files = files if files is not None else self.files
        out = self.out()
        B.write_bundle(out, self.manifest(files, **kw), files, signers or self.keys[:2])
        return out

    def parts(self, files: dict[str, bytes] | None = None, **kw: Any) -> tuple[bytes, bytes]:
        man = self.manifest(files, **kw)
        return json.dumps(man).encode(), B.sign_manifest(man, self.keys[:2])

    def raw(self, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
        out = self.out()
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
            for ti, data in members:
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return out

    def signed_then(self, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
        mb, sb = self.parts()
        return self.raw(
            [reg("manifest.json", mb), reg("manifest.sig", sb), *extra]
            + [reg(k, v) for k, v in sorted(self.files.items())]
        )

    def signed_then_raw(self, raw: bytes) -> Path:
        """manifest + signature, then hand-built header bytes in place of the payload."""
        mb, sb = self.parts()
        out = self.raw([reg("manifest.json", mb), reg("manifest.sig", sb)])
        data = out.read_bytes().rstrip(b"\0")
        out.write_bytes(data + b"\0" * (-len(data) % 512) + raw)
        return out


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _member(name: bytes, body: bytes, flag: bytes) -> bytes:
    """One ustar header (hand-built: tarfile would not write these) and its padded body."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = b"%011o\0" % len(body)
    h[136:148] = b"00000000000\0"
    h[156:157] = flag
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + body + b"\0" * (-len(body) % 512)


def pax_flood(n: int) -> bytes:
    line = b" comment=" + b"a" * 200 + b"\n"
    rec = b"%d" % (len(line) + 3) + line
    return _member(b"././@PaxHeader", rec * (n // len(rec) + 1), b"x") + _member(
        b"model.onnx", b"x", b"0"
    )


def attack_cases(k: Kit) -> dict[str, Callable[[], Path]]:
    f = k.files
    other_model = (REF / "model_fp32.onnx").read_bytes()

    def tampered_model() -> Path:
        mb, sb = k.parts()
        bad = dict(f, **{"model.onnx": f["model.onnx"][:-1] + b"\x00"})
        return k.raw(
            [reg("manifest.json", mb), reg("manifest.sig", sb)]
            + [reg(n, v) for n, v in sorted(bad.items())]
        )

    def tampered_manifest() -> Path:
        man = k.manifest()
        sb = B.sign_manifest(man, k.keys[:2])
        man["security_counter"] = STORED_COUNTER + 2  # edited after signing
        return k.raw(
            [reg("manifest.json", json.dumps(man).encode()), reg("manifest.sig", sb)]
            + [reg(n, v) for n, v in sorted(f.items())]
        )

    def unsigned() -> Path:
        mb, _ = k.parts()
        return k.raw([reg("manifest.json", mb)] + [reg(n, v) for n, v in sorted(f.items())])

    def mix_and_match() -> Path:
        mb, sb = k.parts()
        mixed = dict(f, **{"model.onnx": other_model})
        return k.raw(
            [reg("manifest.json", mb), reg("manifest.sig", sb)]
            + [reg(n, v) for n, v in sorted(mixed.items())]
        )

    def missing_file() -> Path:
        files = dict(f, **{"notes.txt": b"hello"})
        mb, sb = k.parts(files)
        return k.raw(
            [reg("manifest.json", mb), reg("manifest.sig", sb)]
            + [reg(n, v) for n, v in sorted(f.items())]
        )

    def extra_file() -> Path:
        mb, sb = k.parts()
        return k.raw(
            [reg("manifest.json", mb), reg("manifest.sig", sb)]
            + [reg(n, v) for n, v in sorted(f.items())]
            + [reg("evil.so", b"\x7fELF")]
        )

    def link(kind: bytes, name: str, target: str) -> Callable[[], Path]:
        def make() -> Path:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.linkname = target
            return k.signed_then([(ti, None)])

        return make

    def device() -> Path:
        ti = tarfile.TarInfo("model.onnx")
        ti.type = tarfile.CHRTYPE
        ti.devmajor, ti.devminor = 1, 5
        return k.signed_then([(ti, None)])

    def endless_member() -> Path:
        ti = tarfile.TarInfo("model.onnx")
        ti.size = 8**11 - 1
        return k.signed_then_raw(ti.tobuf(format=tarfile.USTAR_FORMAT) + os.urandom(4096))

    def pax_size() -> Path:
        ti = tarfile.TarInfo("model.onnx")
        ti.size = 100 << 30
        return k.signed_then_raw(ti.tobuf(format=tarfile.PAX_FORMAT) + os.urandom(4096))

    def gnu_longname() -> Path:
        ti = tarfile.TarInfo("m/" * 80 + "model.onnx")
        ti.size = 4
        return k.signed_then_raw(ti.tobuf(format=tarfile.GNU_FORMAT) + b"abcd" + b"\0" * 508)

    def unsigned_pax_flood() -> Path:
        # Issue #12's 5.6 s stall: a pax header flood with no valid manifest at all.
        out = k.out()
        out.write_bytes(pax_flood(40 * 1024) + b"\0" * 1024)
        return out

    def manifest_not_first() -> Path:
        mb, sb = k.parts()
        return k.raw(
            [reg("model.onnx", f["model.onnx"]), reg("manifest.json", mb), reg("manifest.sig", sb)]
        )

    def fifo() -> Path:
        p = k.work / "fifo.bundle"
        os.mkfifo(p)
        return p

    def keyring(version: int) -> Callable[[], Path]:
        def make() -> Path:
            doc = B.make_keyring(
                [x.public_key() for x in k.keys], threshold=2, version=version, signers=k.keys
            )
            p = k.work / f"keyring-v{version}.json"
            p.write_bytes(B.keyring_bytes(doc))
            return p

        return make

    now = time.time()
    return {
        "tampered_model": tampered_model,
        "tampered_manifest": tampered_manifest,
        "unsigned": unsigned,
        "empty_signatures": lambda: _empty_sigs(k),
        "wrong_key": lambda: k.bundle(
            signers=[Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()]
        ),
        "below_threshold": lambda: k.bundle(signers=k.keys[:1]),
        "same_key_twice": lambda: k.bundle(signers=[k.keys[0], k.keys[0]]),
        "expired": lambda: k.bundle(created=now - 7200, expires=now - 3600),
        "counter_rollback": lambda: k.bundle(security_counter=STORED_COUNTER - 1),
        "fast_forward": lambda: k.bundle(security_counter=STORED_COUNTER + 17),
        "version_rollback": lambda: k.bundle(version="0.9.0"),
        "replay_same_version": lambda: k.bundle(version="2.0.0"),
        "mix_and_match": mix_and_match,
        "missing_file": missing_file,
        "extra_file": extra_file,
        "path_traversal": lambda: k.signed_then([reg("../../../etc/cron.d/evil", b"* * * * *\n")]),
        "absolute_path": lambda: k.signed_then([reg("/etc/passwd", b"x")]),
        "symlink": link(tarfile.SYMTYPE, "model.onnx", "/etc/shadow"),
        "hardlink": link(tarfile.LNKTYPE, "golden-io.npz", "manifest.json"),
        "device": device,
        "endless_member": endless_member,
        "pax_size": pax_size,
        "pax_flood": lambda: k.signed_then_raw(pax_flood(1 << 20)),
        "pax_flood_unsigned": unsigned_pax_flood,
        "gnu_longname": gnu_longname,
        "oversized_bundle": lambda: k.bundle(
            files=dict(f, **{"pad.bin": os.urandom(4 * 1024 * 1024)})
        ),
        "fifo_endless": fifo,
        "wrong_hardware": lambda: k.bundle(hardware_ids=["jetson-orin"]),
        "unknown_model": lambda: k.bundle(model_name="other"),
        "manifest_not_first": manifest_not_first,
        "keyring_rollback": keyring(1),
        "keyring_version_jump": keyring(3),
    }


def _empty_sigs(k: Kit) -> Path:
    out = k.out()
    man = k.manifest()
    B.write_tar(
        out,
        [
            ("manifest.json", json.dumps(man).encode()),
            ("manifest.sig", json.dumps({"signatures": []}).encode()),
            *sorted(k.files.items()),
        ],
    )
    return out


# -- daemon -----------------------------------------------------------------------------------


def daemon_config(work: Path, kit: Kit) -> dict[str, Any]:
    text = (REPO / "edgerund" / "data" / "simulate.yaml").read_text()
    cfg: dict[str, Any] = yaml.safe_load(text.replace("${EDGERUND_SHARE}", str(REPO)))
    cfg["paths"] = {"state_dir": str(work / "state"), "run_dir": str(work / "run")}
    cfg["diag"] = {"socket": str(work / "diag.sock"), "mode": 0o660}
    cfg["logging"] = {"format": "json", "level": "info"}
    upd = dict(cfg.get("updates") or {})
    upd.update(
        enabled=True,
        keyring_file=str(kit.keyring_path),
        bundle_max_mb=3.0,
        file_max_mb=3.0,
        probation_s=1.0,
    )
    # The per-source rate limit (where present) would answer `rate_limited` before the
    # defence under test: every bundle here must reach the trust check.
    if "source_per_min" in UpdatesConfig.__struct_fields__:
        upd.update(source_per_min=6000.0, source_burst=1000)
    cfg["updates"] = upd
    cfg.pop("telemetry", None)
    daemon = dict(cfg.get("daemon") or {})
    daemon["loop_lag_interval_ms"] = 20  # a stall shows within 20 ms
    cfg["daemon"] = daemon
    return cfg


def motor(d: DaemonProc) -> dict[str, Any]:
    loops = d.call("status")["loops"]
    return next(lp for lp in loops if lp["id"] == "motor")


def model_row(d: DaemonProc) -> tuple[Any, Any]:
    for m in d.call("status")["models"]:
        if m["name"] == MODEL:
            return m.get("active_slot"), m.get("version")
    return None, None


def feed_bundles(d: DaemonProc, kit: Kit, log: Callable[[str], None]) -> dict[str, Any]:
    refused = tried = 0
    codes: dict[str, str] = {}
    before = model_row(d)
    for name, make in attack_cases(kit).items():
        path = make()
        tried += 1
        t0 = time.monotonic()
        try:
            res = d.call("update", {"path": str(path), "wait": "commit"}, timeout_s=120)
            code = f"ACCEPTED:{res.get('state') if isinstance(res, dict) else res}"
        except CommandError as exc:
            code = exc.code
        ok = not code.startswith("ACCEPTED") and model_row(d) == before
        refused += int(ok)
        codes[name] = code
        log(
            f"  {name:22s} {'refused' if ok else 'NOT REFUSED'}: {code} "
            f"({(time.monotonic() - t0) * 1e3:.0f} ms)"
        )
    return {"malicious_bundles_tried": tried, "malicious_bundles_refused": refused, "codes": codes}


def _exchange(sock: socket.socket, payload: bytes, timeout_s: float = 5.0) -> dict[str, Any] | None:
    sock.settimeout(timeout_s)
    sock.sendall(payload)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    out: dict[str, Any] = json.loads(buf.splitlines()[-1])
    return out


def feed_socket(d: DaemonProc, log: Callable[[str], None]) -> dict[str, Any]:
    """Socket attacks: each answered with an error, the connection kept, the daemon serving."""
    handled = tried = 0
    cases = {
        "nested_json": b"[" * 20000 + b"\n",
        "malformed_json": b'{"id": 1, "cmd": \n',
        "oversized_line": b'{"id": 1, "cmd": "status", "args": {"x": "'
        + b"a" * (2 << 20)
        + b'"}}\n',
        "unknown_command": b'{"id": 1, "cmd": "rm -rf", "args": {}}\n',
    }
    for name, payload in cases.items():
        tried += 1
        ok = False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(d.socket)
                r = _exchange(s, payload)
                ok = r is not None and r.get("ok") is False
                if ok and name != "oversized_line":  # the connection still serves
                    r2 = _exchange(s, b'{"id": 2, "cmd": "status", "args": {}}\n')
                    ok = r2 is not None and r2.get("ok") is True
        except (OSError, ValueError) as exc:
            log(f"  {name}: {type(exc).__name__}: {exc}")
        handled += int(ok)
        log(f"  {name:22s} {'answered with an error' if ok else 'NOT HANDLED'}")
    # Idle connections must not lock a fresh client out.
    tried += 1
    idle = []
    try:
        for _ in range(60):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            idle.append(s)
        t0 = time.monotonic()
        ok = bool(d.call("status", timeout_s=10))
        log(f"  {'idle_connections_60':22s} fresh status in {(time.monotonic() - t0) * 1e3:.0f} ms")
        handled += int(ok)
    except (OSError, CommandError, ValueError) as exc:
        log(f"  idle_connections_60: NOT HANDLED ({type(exc).__name__}: {exc})")
    finally:
        for s in idle:
            s.close()
    return {"socket_attacks_tried": tried, "socket_attacks_handled": handled}


class LagPoller:
    """Polls `status` every `interval_s` in a thread and keeps the largest `loop_lag_ms`
    (the daemon's own monitor: how late it woke, sampled every loop_lag_interval_ms; the
    control loops run on this event loop, so a stall shows here). The daemon's lateness
    histograms are cumulative since start; this sees one window."""

    def __init__(self, d: DaemonProc, interval_s: float = 0.01) -> None:
        self.d = d
        self.interval_s = interval_s
        self.max_ms = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with DiagClient(self.d.socket, timeout_s=10) as c:
            while not self._stop.is_set():
                st = c.call("status")
                self.max_ms = max(self.max_ms, float(st.get("loop_lag_ms") or 0.0))
                self.samples += 1
                time.sleep(self.interval_s)

    def __enter__(self) -> LagPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def run_attacks(work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    kit = Kit(work)
    counter = work / "state" / "updates" / "security_counter"
    counter.parent.mkdir(parents=True)
    counter.write_text(f"{STORED_COUNTER}\n")
    d = DaemonProc(work, daemon_config(work, kit), simulate=True)
    fig: dict[str, Any] = {}
    with d:
        ready = d.wait_ready(120)
        log(f"daemon ready in {ready:.1f} s; warming up the loop")
        time.sleep(8.0)  # start-up (model load, first windows) stays out of the figures
        # Baseline: the same measurement over an idle window as long as the attacks.
        b0 = motor(d)
        t0 = time.monotonic()
        with LagPoller(d) as idle:
            time.sleep(6.0)
        b1 = motor(d)
        idle_s = time.monotonic() - t0
        m0 = motor(d)
        log(
            f"idle {idle_s:.1f} s: loop lag max {idle.max_ms:.2f} ms ({idle.samples} samples), "
            f"motor loop {int(b1['ticks']) - int(b0['ticks'])} ticks, "
            f"{int(b1['missed']) - int(b0['missed'])} missed"
        )
        t0 = time.monotonic()
        with LagPoller(d) as during:
            log("malicious bundles (update over the diagnostics socket):")
            fig.update(feed_bundles(d, kit, log))
            log("diagnostics socket:")
            fig.update(feed_socket(d, log))
            time.sleep(0.5)  # the loop status summary is cached up to STATUS_CACHE_S
        attack_s = time.monotonic() - t0
        m1 = motor(d)
        # A genuine result of this daemon's identity: the forger may replay or alter it.
        fig["genuine_attestation"] = d.call("attest", {"nonce": os.urandom(32).hex()})
    max_before = float(m0["lateness_ms"]["max"] or 0.0)
    max_after = float(m1["lateness_ms"]["max"] or 0.0)
    fig.update(
        attack_window_s=round(attack_s, 2),
        missed_ticks_during_attacks=int(m1["missed"]) - int(m0["missed"]),
        ticks_during_attacks=int(m1["ticks"]) - int(m0["ticks"]),
        max_loop_stall_ms_during_attacks=round(during.max_ms, 3),
        max_loop_stall_ms_idle_baseline=round(idle.max_ms, 3),
        missed_ticks_idle_baseline=int(b1["missed"]) - int(b0["missed"]),
        loop_lag_samples_during_attacks=during.samples,
        motor_lateness_max_ms_rose_during_attacks=max_after > max_before,
    )
    log(
        f"attacks {attack_s:.1f} s: loop lag max {during.max_ms:.2f} ms ({during.samples} "
        f"samples), motor loop {fig['ticks_during_attacks']} ticks, "
        f"{fig['missed_ticks_during_attacks']} missed; the motor loop's cumulative lateness "
        f"max {'ROSE to ' + str(max_after) if max_after > max_before else 'did not rise'} "
        f"(it was {max_before} ms since start)"
    )
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crash-limit", type=int, default=None, help="crash states per scenario")
    ap.add_argument("--skip-crash", action="store_true", help="leave out the power-cut check")
    args = ap.parse_args()
    fig: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgerund-attacks-") as tmp:
        work = Path(tmp)
        fig.update(run_attacks(work / "daemon", print))
        from edgerund.backend.forgeries import forged_quotes_accepted

        # The verifier pinned this gateway's AK at enrolment; the software identity's
        # result plays a genuine earlier TPM result of it (as tests/identity does).
        genuine = fig.pop("genuine_attestation")
        fq = forged_quotes_accepted(ak_pem=genuine["ak_pem"], genuine=dict(genuine, kind="tpm"))
        fig.update(
            forged_quotes_tried=fq["forged_quotes_tried"],
            forged_quotes_accepted=fq["forged_quotes_accepted"],
        )
        print(
            f"forged quotes: {fq['forged_quotes_accepted']} of {fq['forged_quotes_tried']} accepted"
        )
        if not args.skip_crash:
            from edgerund.toolkit.crashsim.__main__ import figures

            print("power cuts (ALICE-style, edgerund/toolkit/crashsim):")
            fig.update(figures(args.crash_limit, None, work / "crash"))
    fig.pop("codes", None)  # printed per case above
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
