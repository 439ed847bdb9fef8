"""`edgerunctl check`: named health checks, each OK / WARN / FAIL with one line of
explanation and, when not OK, what to do. Exit code 0 / 1 / 2 for the worst result.

It works with the daemon down: the checks that need it (sensor rates, loops, models,
backlog) then say so, and the rest (config, devices, clock, disk, broker, TPM node) run
from the config file alone. Every check is a small function of (config, status) so it is
testable without hardware; the few probes of the machine (device nodes, a TCP/TLS
connection to the broker, the clock) are in their own functions.

One cohesive thing (the list of health checks, each a small function with its verdict
and fix), hence one module of ~560 lines.
"""

from __future__ import annotations

import datetime
import grp
import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerund.config.loader import load_config
from edgerund.config.schema import Config
from edgerund.errors import ConfigError
from edgerund.tlsfiles import TlsFileError, client_context

OK, WARN, FAIL = "OK", "WARN", "FAIL"
LEVEL = {OK: 0, WARN: 1, FAIL: 2}
SERVICE_USER = "edgerund"


@dataclass(frozen=True)
class Result:
    name: str
    level: str
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"check": self.name, "result": self.level, "message": self.message, "fix": self.fix}


# ----------------------------------------------------------------------------- probes


def device_access(path: str, user: str = SERVICE_USER) -> tuple[bool, str]:
    """(ok, reason): the node exists and the service user can read and write it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False, f"{path} does not exist"
    except PermissionError:
        return False, f"{path}: permission denied to stat"
    if not stat.S_ISCHR(st.st_mode):
        return False, f"{path} is not a character device"
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        # No service user on this machine (a development box): judge by our own access.
        return (
            os.access(path, os.R_OK | os.W_OK),
            f"{path} not readable+writable by uid {os.geteuid()}",
        )
    if pw.pw_uid == 0:
        return True, ""
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {pw.pw_gid}
    mode = st.st_mode
    if st.st_uid == pw.pw_uid:
        ok = bool(mode & stat.S_IRUSR and mode & stat.S_IWUSR)
    elif st.st_gid in groups:
        ok = bool(mode & stat.S_IRGRP and mode & stat.S_IWGRP)
    else:
        ok = bool(mode & stat.S_IROTH and mode & stat.S_IWOTH)
    try:
        gname = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        gname = str(st.st_gid)
    return ok, (
        f"{path} (group {gname}, mode {stat.filemode(mode)}) is not accessible to user {user}"
    )


def _kernel_clock_synced() -> bool | None:
    """The kernel's own view (ntp_adjtime read-only): TIME_ERROR (5) means unsynchronised.
    NTP daemons (timesyncd, chrony, ntpd) clear STA_UNSYNC once they discipline the clock."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
        state = int(libc.ntp_adjtime(buf))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != 5


def clock_synchronised() -> bool | None:
    """True/False from the kernel (ntp_adjtime), else timedatectl; None when unknown."""
    if Path("/run/systemd/timesync/synchronized").exists():
        return True
    kernel = _kernel_clock_synced()
    if kernel is not None:
        return kernel
    exe = shutil.which("timedatectl")
    if exe:
        try:
            r = subprocess.run(
                [exe, "show", "-p", "NTPSynchronized", "--value"],
                capture_output=True,
                text=True,
                timeout=3,
            )
            if r.returncode == 0 and r.stdout.strip() in ("yes", "no"):
                return r.stdout.strip() == "yes"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def broker_probe(
    host: str, port: int, tls: dict[str, str] | None, timeout_s: float = 3.0
) -> tuple[str, str, str]:
    """Connect to the broker (and handshake TLS); returns (level, message, fix)."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return (
            FAIL,
            f"broker {host}:{port} unreachable: {exc}",
            "check the network, DNS, firewall and uplink.host/port",
        )
    if not tls:
        raw.close()
        return OK, f"broker {host}:{port} reachable (no TLS)", ""
    try:
        ctx = client_context(
            tls.get("ca_file") or None, tls.get("cert_file") or None, tls.get("key_file") or None
        )
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            cert = s.getpeercert()
    except (ssl.SSLError, OSError, TlsFileError) as exc:
        raw.close()
        return (
            FAIL,
            f"TLS handshake with {host}:{port} failed: {exc}",
            "check uplink.tls files, the CA, and the gateway clock",
        )
    not_after = cert.get("notAfter") if cert else None
    if not isinstance(not_after, str):
        return OK, f"broker {host}:{port} TLS ok", ""
    days = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400
    if days < 14:
        return (
            WARN,
            f"broker certificate expires in {days:.0f} days",
            "ask the backend team to renew the broker certificate",
        )
    return OK, f"broker {host}:{port} TLS ok, certificate valid {days:.0f} more days", ""


def client_cert_days(path: str) -> float | None:
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days


# ----------------------------------------------------------------------------- checks


def _simulated(cfg: Config | None, st: dict[str, Any] | None) -> bool:
    return bool((st or {}).get("simulate")) or bool(cfg and cfg.simulation.enabled)


def check_daemon(st: dict[str, Any] | None, error: str | None) -> Result:
    if st is None:
        return Result(
            "daemon",
            FAIL,
            f"not reachable: {error}",
            "systemctl status edgerund; journalctl -u edgerund -n 50",
        )
    return Result(
        "daemon",
        OK,
        f"running, version {st.get('version')}, up "
        f"{st.get('uptime_s', 0):.0f} s, loop lag "
        f"{st.get('loop_lag_ms', 0):.2f} ms",
    )


def check_config(path: Path) -> tuple[Result, Config | None]:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return Result("config", FAIL, str(exc), f"fix {path}, then: edgerund check-config"), None
    return Result(
        "config", OK, f"{path} is valid ({len(cfg.sensors)} sensors, {len(cfg.loops)} loops)"
    ), cfg


def _sensor_device(sensor: Any) -> str | None:
    bus = getattr(sensor, "bus", None)
    if isinstance(bus, int):
        return f"/dev/i2c-{bus}"
    port = getattr(sensor, "port", None)
    if isinstance(port, str) and port.startswith("/"):
        return port
    chip = getattr(sensor, "chip", None)  # a GPIO input: its chip's character device
    if isinstance(chip, str):
        return chip if chip.startswith("/") else f"/dev/{chip}"
    return None


def check_devices(
    cfg: Config,
    st: dict[str, Any] | None,
    access: Callable[[str], tuple[bool, str]] = device_access,
) -> Result:
    if _simulated(cfg, st):
        return Result("devices", OK, "simulated mode: sensors are emulated")
    problems: list[str] = []
    seen: set[str] = set()
    for s in cfg.sensors:
        dev = _sensor_device(s)
        if dev is None or dev in seen or not getattr(s, "enabled", True):
            continue
        seen.add(dev)
        ok, why = access(dev)
        if not ok:
            problems.append(f"sensor {s.id}: {why}")
    if problems:
        return Result(
            "devices",
            FAIL,
            "; ".join(problems),
            "check wiring/cables and `ls -l` the device; the service user needs "
            "the device's group (dialout for serial, i2c for I2C, gpio for GPIO): usermod -aG",
        )
    return Result("devices", OK, f"{len(seen)} configured buses/ports present and accessible")


def check_sensors(st: dict[str, Any] | None) -> Result:
    if st is None:
        return Result("sensors", WARN, "daemon down: sensor rates unknown")
    failed, slow = [], []
    for s in st.get("sensors") or []:
        if s.get("state") == "failed":
            failed.append(f"{s.get('id')} ({s.get('last_error') or 'failed'})")
            continue
        want, got = s.get("rate_hz"), s.get("rate_achieved_hz")
        if (
            isinstance(want, (int, float))
            and isinstance(got, (int, float))
            and want > 0
            and s.get("state") == "ok"
            and got < 0.8 * want
        ):
            slow.append(f"{s.get('id')} {got:.3g}/{want:.3g} Hz")
    if failed:
        return Result(
            "sensors",
            FAIL,
            "failed: " + ", ".join(failed),
            "edgerunctl sensors; check wiring and power; edgerunctl log -n 50",
        )
    if slow:
        return Result(
            "sensors",
            WARN,
            "below 80% of configured rate: " + ", ".join(slow),
            "lower rate_hz, or check bus speed / USB latency_timer",
        )
    return Result("sensors", OK, f"{len(st.get('sensors') or [])} sensors ok at their rates")


def check_loops(st: dict[str, Any] | None, later: dict[str, Any] | None = None) -> Result:
    """Loops on time: missed ticks over an observation window (two status samples a
    second apart; a few misses while the daemon started do not count against it), and
    the median lateness against the period."""
    if st is None:
        return Result("loops", WARN, "daemon down: loop timing unknown")
    before = {lp.get("id"): lp for lp in st.get("loops") or []}
    issues = []
    for lp in (later or st).get("loops") or []:
        lid = lp.get("id")
        old = before.get(lid, {}) if later is not None else {}
        ticks = (lp.get("ticks") or 0) - (old.get("ticks") or 0)
        missed = (lp.get("missed") or 0) - (old.get("missed") or 0)
        late = (lp.get("lateness_ms") or {}).get("p50")
        period = lp.get("period_ms")
        if missed and missed > 0.01 * max(ticks, 1):
            window = "in the last second" if later is not None else "since start"
            issues.append(f"{lid} missed {missed} of {ticks + missed} ticks {window}")
        elif (
            isinstance(late, (int, float))
            and isinstance(period, (int, float))
            and late > 0.5 * period
        ):
            issues.append(f"{lid} median lateness {late} ms of a {period} ms period")
        rules_only = lp.get("reason") == "no model configured"
        if lp.get("mode") not in (None, "model") and not rules_only:
            issues.append(f"{lid} on fallback ({lp.get('reason') or lp.get('mode')})")
    if issues:
        return Result(
            "loops",
            WARN,
            "; ".join(issues),
            "edgerunctl loops; check CPU load (top), sensors feeding the loop",
        )
    return Result("loops", OK, f"{len(st.get('loops') or [])} loops on time")


def check_models(st: dict[str, Any] | None) -> Result:
    if st is None:
        return Result("models", WARN, "daemon down: model state unknown")
    bad = [
        m
        for m in st.get("models") or []
        if str(m.get("state", "")).lower() in ("failed", "rolled_back", "invalid", "fault")
    ]
    quarantined = [
        f"{m.get('name')}: slot {slot} quarantined ({(q or {}).get('reason')}: {(q or {}).get('message')})"
        for m in st.get("models") or []
        for slot, q in sorted((m.get("quarantined") or {}).items())
    ]
    if quarantined:
        return Result(
            "models",
            WARN,
            "; ".join(quarantined),
            "a slot failed re-verification at start-up and is not used: edgerunctl models;"
            " install a signed bundle again",
        )
    if bad:
        return Result(
            "models",
            WARN,
            "; ".join(
                f"{m.get('name')}: {m.get('state')} ({m.get('last_failure') or m.get('reason')})"
                for m in bad
            ),
            "edgerunctl models; the previous slot stays active",
        )
    return Result(
        "models",
        OK,
        ", ".join(f"{m.get('name')} v{m.get('version')}" for m in st.get("models") or [])
        or "no models",
    )


def check_updates(st: dict[str, Any] | None) -> Result:
    """Updates that would be refused whatever the bundle (no usable keyring, no trustworthy
    anti-rollback counter)."""
    upd = (st or {}).get("updates")
    if not isinstance(upd, dict):
        return Result("updates", OK, "updates not enabled" if st is not None else "unknown")
    refused = upd.get("refused")
    if isinstance(refused, dict):
        return Result(
            "updates",
            FAIL,
            f"every update is refused: {refused.get('reason')}: {refused.get('message')}",
            "deliver the missing keyring rotations (keyring_below_floor), or fix the TPM"
            " (counter_unavailable); see docs/updates.md",
        )
    kr = upd.get("keyring") or {}
    return Result("updates", OK, f"keyring v{kr.get('version')}, counter {upd.get('counter_kind')}")


def check_identity(
    cfg: Config | None,
    st: dict[str, Any] | None,
    access: Callable[[str], tuple[bool, str]] = device_access,
) -> Result:
    ident = (st or {}).get("identity") or {}
    if cfg is None and st is None:
        return Result(
            "tpm", WARN, "no valid config and no daemon: identity unknown", "fix the config first"
        )
    kind = ident.get("kind") or (cfg.identity.kind if cfg else None)
    if kind == "software" and _simulated(cfg, st):
        return Result("tpm", OK, "simulated mode: software identity, as configured")
    if kind == "software" or (cfg and cfg.identity.kind == "software"):
        return Result(
            "tpm",
            WARN,
            "software identity: keys are on disk, not in a TPM",
            "set identity.kind: tpm on hardware with a TPM 2.0",
        )
    tcti = str(getattr(cfg.identity, "tcti", "device:/dev/tpmrm0")) if cfg else ""
    if tcti.startswith("device:"):
        ok, why = access(tcti.split(":", 1)[1] or "/dev/tpmrm0")
        if not ok:
            return Result(
                "tpm",
                FAIL,
                why,
                "enable the TPM (dtoverlay=tpm-slb9670 on a Pi); the service user needs group tss",
            )
    if ident.get("lockout"):
        return Result(
            "tpm",
            FAIL,
            "the TPM is in dictionary-attack lockout",
            "wait for the lockout to expire or tpm2_dictionarylockout -c -p OWNERAUTH",
        )
    if st is not None and kind == "tpm":
        return Result("tpm", OK, f"TPM identity, key {ident.get('key_id')}")
    return Result("tpm", OK, f"TPM node accessible ({tcti})")


def check_clock(
    now: float | None = None, synced: Callable[[], bool | None] = clock_synchronised
) -> Result:
    t = time.time() if now is None else now
    if datetime.datetime.fromtimestamp(t, datetime.UTC).year < 2025:
        return Result(
            "clock",
            FAIL,
            "the clock is in the past: TLS and bundle expiry break",
            "enable NTP (timedatectl set-ntp true) or fit an RTC",
        )
    s = synced()
    if s is False:
        return Result(
            "clock",
            WARN,
            "the kernel reports the clock as not NTP-synchronised",
            "timedatectl set-ntp true; check that UDP 123 is allowed",
        )
    if s is None:
        return Result(
            "clock",
            WARN,
            "cannot tell whether the clock is synchronised",
            "install systemd-timesyncd or chrony",
        )
    return Result("clock", OK, "NTP-synchronised")


def check_disk(cfg: Config | None) -> Result:
    state = Path(cfg.paths.state_dir if cfg else "/var/lib/edgerund")
    probe = state if state.exists() else state.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return Result("disk", FAIL, f"cannot stat {probe}: {exc}", "check the filesystem")
    free_mb = usage.free / 2**20
    cap = float(getattr(getattr(cfg, "telemetry", None), "spool_max_mb", 0) or 0)
    if free_mb < 50 or (cap and free_mb < 0.25 * cap):
        return Result(
            "disk",
            FAIL,
            f"{free_mb:.0f} MB free on {probe}",
            "free space; the spool needs room up to telemetry.spool_max_mb",
        )
    if cap and free_mb < 1.2 * cap:
        return Result(
            "disk",
            WARN,
            f"{free_mb:.0f} MB free, spool cap {cap:.0f} MB",
            "lower telemetry.spool_max_mb or free space",
        )
    return Result("disk", OK, f"{free_mb:.0f} MB free on {probe}")


def check_broker(
    cfg: Config | None, probe: Callable[..., tuple[str, str, str]] = broker_probe
) -> Result:
    up = getattr(cfg, "uplink", None)
    if up is None or not getattr(up, "enabled", False):
        return Result("broker", OK, "uplink disabled (telemetry stays in the local spool)")
    host = str(getattr(up, "host", "localhost"))
    port = int(getattr(up, "port", 1883))
    tls_cfg = getattr(up, "tls", None)
    tls: dict[str, str] | None = None
    if (
        tls_cfg is not None
        and getattr(tls_cfg, "enabled", True)
        and (getattr(tls_cfg, "ca_file", "") or getattr(tls_cfg, "cert_file", ""))
    ):
        tls = {k: str(getattr(tls_cfg, k, "") or "") for k in ("ca_file", "cert_file", "key_file")}
    level, msg, fix = probe(host, port, tls)
    if level == OK and tls and tls.get("cert_file"):
        days = client_cert_days(tls["cert_file"])
        if days is not None and days < 30:
            return Result(
                "broker",
                WARN if days > 0 else FAIL,
                f"{msg}; client certificate expires in {days:.0f} days",
                "renew the gateway's client certificate",
            )
    return Result("broker", level, msg, fix)


def check_backlog(st: dict[str, Any] | None) -> Result:
    if st is None:
        return Result("backlog", WARN, "daemon down: backlog unknown")
    tel = st.get("telemetry") or {}
    age = tel.get("backlog_oldest_age_s", tel.get("oldest_age_s"))
    n = tel.get("backlog_batches", 0)
    if isinstance(age, (int, float)) and age > 86400:
        return Result(
            "backlog",
            FAIL,
            f"{n} batches waiting, oldest {age / 3600:.0f} h",
            "check the broker check above and `edgerunctl telemetry`",
        )
    if isinstance(age, (int, float)) and age > 3600:
        return Result(
            "backlog",
            WARN,
            f"{n} batches waiting, oldest {age / 60:.0f} min",
            "the uplink is not draining: edgerunctl telemetry",
        )
    return Result("backlog", OK, f"{n} batches waiting")


# ----------------------------------------------------------------------------- real-time

REALTIME_EXAMPLE = "/usr/share/doc/edgerund/examples/realtime.conf"
DROPIN_DIRS = (
    "/etc/systemd/system/edgerund.service.d",
    "/run/systemd/system/edgerund.service.d",
)
_RT_NAMES = {os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR"}
_POLICY_NAMES = {
    os.SCHED_OTHER: "SCHED_OTHER",
    os.SCHED_BATCH: "SCHED_BATCH",
    os.SCHED_IDLE: "SCHED_IDLE",
    **_RT_NAMES,
}


@dataclass(frozen=True)
class ThreadSched:
    tid: int
    policy: int  # os.SCHED_* (without the SCHED_RESET_ON_FORK flag)
    priority: int  # the real-time priority, 0 for the normal policies


def thread_scheduling(pid: int) -> list[ThreadSched] | None:
    """The scheduling policy of every thread of process `pid` (its tasks in /proc; the
    thread whose id is `pid` runs the event loop), or None when they cannot be read (no
    such process in this PID namespace, /proc hidden)."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        return None
    out = []
    for tid in tids:
        try:
            policy = os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK
            priority = os.sched_getparam(tid).sched_priority
        except OSError:  # the thread ended meanwhile
            continue
        out.append(ThreadSched(tid, policy, priority))
    return out or None


def realtime_dropins(dirs: tuple[str, ...] = DROPIN_DIRS) -> list[str]:
    """Drop-ins of the edgerund unit that ask for a real-time policy."""
    found = []
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".conf"):
                continue
            try:
                text = Path(d, name).read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.strip().partition("=")
                if key.strip() == "CPUSchedulingPolicy" and value.strip().lower() in (
                    "fifo",
                    "rr",
                ):
                    found.append(str(Path(d, name)))
                    break
    return found


def check_realtime(
    st: dict[str, Any] | None, threads: list[ThreadSched] | None, dropins: list[str]
) -> Result:
    """Is real-time scheduling in effect for the event-loop thread (which runs the control
    loops and the drivers) and the threads it started? Off is the shipped default, so it
    is OK unless a drop-in asks for it and it is not in effect, or only some threads
    have it (set by hand with chrt -p on one thread, say)."""
    fix = (
        f"install the drop-in {REALTIME_EXAMPLE} into /etc/systemd/system/edgerund.service.d/, "
        "then systemctl daemon-reload && systemctl restart edgerund"
    )
    asked = f" ({', '.join(dropins)} asks for it)" if dropins else ""
    if st is None or not isinstance(st.get("pid"), int):
        return Result("realtime", WARN, "daemon down: scheduling unknown" + asked)
    pid = st["pid"]
    if threads is None:
        return Result(
            "realtime",
            WARN if dropins else OK,
            f"unknown: cannot read the threads of pid {pid} here" + asked,
            "run edgerunctl check on the gateway itself, as root",
        )
    rt = [t for t in threads if t.policy in _RT_NAMES]
    main = next((t for t in threads if t.tid == pid), None)
    n = f"{len(rt)} of {len(threads)} threads real-time"
    if main is not None and main.policy in _RT_NAMES:
        return Result(
            "realtime",
            OK,
            f"in effect: event-loop thread {_RT_NAMES[main.policy]} priority {main.priority}; {n}",
        )
    main_policy = _POLICY_NAMES.get(main.policy, str(main.policy)) if main else "unknown"
    if dropins:
        return Result(
            "realtime",
            WARN,
            f"asked for but not in effect: event-loop thread {main_policy}{asked}",
            "systemctl daemon-reload && systemctl restart edgerund; "
            "systemctl show edgerund -p CPUSchedulingPolicy -p CPUSchedulingPriority",
        )
    if rt:
        return Result("realtime", WARN, f"partly in effect: {n}, not the event-loop thread", fix)
    return Result("realtime", OK, f"not in effect ({main_policy}, the default)", fix)


def run_checks(
    config_path: Path,
    st: dict[str, Any] | None,
    error: str | None = None,
    later: dict[str, Any] | None = None,
) -> list[Result]:
    """Every check. `later` is a second status sample taken a moment after `st`, for the
    checks that judge a window rather than the totals since start."""
    now = later if later is not None else st
    results = [check_daemon(now, error)]
    cfg_result, cfg = check_config(config_path)
    results.append(cfg_result)
    if cfg is not None:
        results.append(check_devices(cfg, now))
    results += [
        check_sensors(now),
        check_loops(st, later),
        check_models(now),
        check_updates(now),
        check_identity(cfg, now),
        check_clock(),
        check_disk(cfg),
        check_broker(cfg),
        check_backlog(now),
    ]
    pid = (now or {}).get("pid")
    threads = thread_scheduling(pid) if isinstance(pid, int) else None
    results.append(check_realtime(now, threads, realtime_dropins()))
    return results


def worst(results: list[Result]) -> int:
    return max((LEVEL[r.level] for r in results), default=0)
