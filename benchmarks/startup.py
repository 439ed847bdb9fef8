"""Start-up time and memory of the daemon in simulated mode, and where they go.

Figures, measured in the same run so that a shared, noisy machine affects both sides:
- ready_s: exec of `edgerund run --simulate` to READY=1 on a fake $NOTIFY_SOCKET (median
  of --runs);
- rss_mb: the daemon's VmRSS after --settle-s (default 30) seconds of running, with the
  environment the shipped systemd unit sets (its `Environment=` lines: MALLOC_ARENA_MAX);
- import_only_s / import_only_rss_mb: a bare `python -c "import onnxruntime, numpy"`,
  the floor that any daemon using these libraries pays;
- the breakdown (printed, and in the JSON): import time per top-level package from
  `python -X importtime` of the same daemon start, and the RSS by mapping kind from
  /proc/PID/smaps (anonymous heap vs each shared library).

- rss_by_import: what each group of imports adds to RSS, imported in the daemon's order in
  a separate process (the libraries' code and data, before any component runs); the
  daemon's RSS minus their sum is what running adds (sessions, buffers, threads, heap).

Bytecode: a private cache (PYTHONPYCACHEPREFIX) holds the bytecode of every module the
daemon imports, as an install has it (Debian byte-compiles the venv at install): the tree
is byte-compiled first and one unmeasured warm-up start fills in the standard library's
and the site-packages' modules (a cache prefix hides their own __pycache__). Without it
the measured run compiled ~500 modules from source: +0.2-0.4 s and +8-10 MB RSS (the
compiler's garbage in the heap), the checkout's figure, not the install's. Runs with no
test-suite import (the notify socket is edgerund.toolkit.daemonproc's).
Targets (issue #18): READY <= 1.0 s, RSS <= 90 MB. The last line is one JSON object.

    python benchmarks/startup.py [--settle-s 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.peers import unit  # noqa: E402
from edgerund.config.loader import simulate_config_path  # noqa: E402
from edgerund.toolkit.daemonproc import NotifySocket  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def smaps_breakdown(pid: int) -> dict[str, float]:
    """RSS in MB by mapping: [anon] (heap, arenas, thread stacks) and each file."""
    out: collections.Counter[str] = collections.Counter()
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            name = Path(head[5]).name if len(head) > 5 else "[anon]"
            if name.startswith("["):
                name = "[anon]" if name in ("[heap]", "[anon]") else name
        elif line.startswith("Rss:"):
            out[name] += int(head[1]) / 1024
    return {k: round(v, 1) for k, v in out.most_common(12)}


def base_env(pycache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["PYTHONPATH"] = str(REPO)
    return env


def import_only(env: dict[str, str]) -> tuple[float, float]:
    code = (
        "import time, sys; t0 = float(sys.argv[1]); import onnxruntime, numpy; "
        "print(time.time() - t0); print(open('/proc/self/status').read())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, repr(time.time())],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    lines = out.splitlines()
    rss = next(int(ln.split()[1]) / 1024 for ln in lines if ln.startswith("VmRSS:"))
    return float(lines[0]), rss


def daemon_run(
    env: dict[str, str], settle_s: float, importtime: bool = False
) -> tuple[float, float, dict[str, float], str]:
    """(ready_s, rss_mb after settle_s, smaps breakdown, the daemon's stderr)."""
    with tempfile.TemporaryDirectory(prefix="edgerund-bench-") as tmp:
        t = Path(tmp)
        cfg = yaml.safe_load(simulate_config_path().read_text())
        cfg.setdefault("paths", {})["state_dir"] = str(t / "state")
        cfg["paths"]["run_dir"] = str(t / "run")
        cfg.setdefault("diag", {})["socket"] = str(t / "diag.sock")
        cfg.setdefault("logging", {})["format"] = "json"
        (t / "edgerund.yaml").write_text(yaml.safe_dump(cfg))
        notify = NotifySocket(t / "notify.sock")
        env = {**env, "NOTIFY_SOCKET": str(t / "notify.sock")}
        cmd = [sys.executable, "-m", "edgerund.cli", "run", "-c", str(t / "edgerund.yaml")]
        if importtime:
            cmd[1:1] = ["-X", "importtime"]
        log = t / "daemon.log"
        try:
            with open(log, "wb") as f:
                t0 = time.monotonic()
                proc = subprocess.Popen(
                    [*cmd, "--simulate"], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO
                )
            try:
                while (ready_at := notify.ready_at) is None:
                    if proc.poll() is not None or time.monotonic() - t0 > 60:
                        raise SystemExit(f"no READY:\n{log.read_text()[-3000:]}")
                    time.sleep(0.01)
                ready = ready_at - t0
                time.sleep(settle_s)
                rss = rss_mb(proc.pid)
                maps = smaps_breakdown(proc.pid)
            finally:
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(20)
            if rc != 0:
                raise SystemExit(f"daemon exited {rc}:\n{log.read_text()[-3000:]}")
        finally:
            notify.close()
        return ready, rss, maps, log.read_text(errors="replace")


def import_breakdown(stderr: str) -> dict[str, float]:
    """Self import time (ms) per top-level package (edgerund/drivers: per subpackage)."""
    tot: collections.Counter[str] = collections.Counter()
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if not m:
            continue
        parts = m.group(2).split(".")
        key = ".".join(parts[:2]) if parts[0] in ("edgerund", "drivers") else parts[0]
        tot[key] += int(m.group(1)) / 1000
    out = {k: round(v, 1) for k, v in tot.most_common(15)}
    out["total"] = round(sum(tot.values()), 1)
    return out


# Imported one group after another in the daemon's order; each figure is the RSS it adds.
IMPORT_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python+asyncio (ssl, libcrypto)", ("asyncio",)),
    ("structlog, msgspec, yaml", ("structlog", "msgspec", "yaml")),
    ("numpy", ("numpy",)),
    ("onnxruntime", ("onnxruntime",)),
    ("cryptography (hazmat)", ("cryptography.hazmat.primitives.serialization",)),
    ("edgerund + drivers (daemon)", ("edgerund.daemon",)),
    ("simulator (drivers.emulated)", ("edgerund.simulation",)),
    ("uvloop", ("uvloop",)),
)


def rss_by_import(env: dict[str, str]) -> dict[str, float]:
    """RSS (MB) each import group adds, in a fresh process (rich marked absent, as
    `edgerund run` does off a TTY)."""
    code = (
        "import json, sys\n"
        "sys.modules['rich'] = None\n"
        "def rss():\n"
        "    for ln in open('/proc/self/status'):\n"
        "        if ln.startswith('VmRSS:'): return int(ln.split()[1]) / 1024\n"
        "out = {'interpreter': rss()}\n"
        "for name, mods in json.loads(sys.argv[1]):\n"
        "    before = rss()\n"
        "    for m in mods: __import__(m)\n"
        "    out[name] = rss() - before\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(IMPORT_GROUPS)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO,
    )
    data = json.loads(res.stdout.splitlines()[-1])
    return {k: round(v, 1) for k, v in data.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settle-s", type=float, default=30.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--no-unit-env", action="store_true", help="without the unit's Environment= lines"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgerund-pyc-") as pyc:
        env = base_env(Path(pyc))
        unit_env = {} if args.no_unit_env else unit.environment()
        # byte-compile the tree into the private cache (what an install does)
        code = "import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=1)"
        for pkg in ("edgerund", "drivers"):
            subprocess.run([sys.executable, "-c", code, str(REPO / pkg)], env=env, check=True)
        # the warm-up start: bytecode of the stdlib and site-packages modules it imports
        daemon_run({**env, **unit_env}, 0.5)
        import_only(env)
        imp = [import_only(env) for _ in range(args.runs)]
        runs = [
            daemon_run({**env, **unit_env}, args.settle_s if i == 0 else 0.5)
            for i in range(args.runs)
        ]
        _, _, _, err = daemon_run({**env, **unit_env}, 0.2, importtime=True)
        by_import = rss_by_import({**env, **unit_env})
    import_s = statistics.median(t for t, _ in imp)
    import_rss = statistics.median(r for _, r in imp)
    ready_s = statistics.median(r[0] for r in runs)
    rss, maps = runs[0][1], runs[0][2]
    imports = import_breakdown(err)
    print(f"import onnxruntime+numpy only: {import_s:.3f} s, {import_rss:.1f} MB RSS")
    print(
        f"daemon --simulate: READY after {ready_s:.3f} s "
        f"(runs: {', '.join(f'{r[0]:.3f}' for r in runs)}; {ready_s / import_s:.2f}x the bare "
        f"imports), RSS {rss:.1f} MB after {args.settle_s:g} s ({rss / import_rss:.2f}x the "
        f"imports); unit environment: {unit_env or 'none'}"
    )
    print(f"import time by package (ms, -X importtime, self): {imports}")
    print(f"RSS by mapping (MB, smaps): {maps}")
    imported = sum(v for k, v in by_import.items())
    print(
        f"RSS by import group (MB, a separate process): {by_import}; sum {imported:.1f} MB, "
        f"so running adds {rss - imported:.1f} MB"
    )
    print(
        f"targets: READY <= 1.0 s ({'met' if ready_s <= 1.0 else 'NOT met'}), "
        f"RSS <= 90 MB ({'met' if rss <= 90 else 'NOT met'})"
    )
    print(
        json.dumps(
            {
                "ready_s": round(ready_s, 3),
                "rss_mb": round(rss, 1),
                "import_only_s": round(import_s, 3),
                "import_only_rss_mb": round(import_rss, 1),
                "ready_vs_import_ratio": round(ready_s / import_s, 2),
                "rss_vs_import_ratio": round(rss / import_rss, 2),
                "unit_environment": unit_env,
                "import_ms_by_package": imports,
                "rss_mb_by_mapping": maps,
                "rss_mb_by_import": by_import,
                "rss_mb_running_adds": round(rss - imported, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
