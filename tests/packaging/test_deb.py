"""Build the .deb and install, upgrade, remove and purge it for real in a clean Debian root.

The root is made by `debootstrap --variant=minbase bookworm` (Debian's archive is
reachable from these machines) and cached as a tarball in ~/.cache/edgerund so that
local runs stay fast; set EDGERUND_FRESH_ROOT=1 to build it fresh. Inside the root
(`chroot`, with /proc, /dev and /dev/pts mounted for the pty-based emulators):
check-config on the shipped config, the daemon in simulated mode answering
`edgerunctl status`, the default-config daemon creating identity and model slots, an
upgrade that keeps config (a modified conffile), identity and models, a broken config
leaving the service not started with the reason, remove keeping state, purge removing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.binaries import IN_CI, require_binary

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgerund"
ROOT_TAR = CACHE / "bookworm-minbase.tar"
MIRROR = os.environ.get("EDGERUND_DEBIAN_MIRROR", "http://deb.debian.org/debian")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def run(cmd: list[str], *, check: bool = True, timeout: float = 900,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r


CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive"}


def in_root(root: Path, *cmd: str, check: bool = True,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run(["chroot", str(root), *cmd], check=check, timeout=timeout, env=CHROOT_ENV)


def _make_root(dest: Path) -> None:
    debootstrap = require_binary("debootstrap", "apt-get install debootstrap")
    if ROOT_TAR.exists() and os.environ.get("EDGERUND_FRESH_ROOT") != "1":
        with tarfile.open(ROOT_TAR) as tf:
            tf.extractall(dest, filter="fully_trusted")
        return
    run([debootstrap, "--variant=minbase", "--include=python3,ca-certificates", "bookworm",
         str(dest), MIRROR], timeout=1500)
    if not IN_CI or os.environ.get("EDGERUND_CACHE_ROOT") == "1":
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = ROOT_TAR.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tf:
            tf.add(dest, arcname=".")
        tmp.replace(ROOT_TAR)


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[None]:
    mounts = [(["-t", "proc", "proc"], root / "proc"), (["--bind", "/dev"], root / "dev"),
              (["--bind", "/dev/pts"], root / "dev" / "pts")]
    done: list[Path] = []
    try:
        for args, target in mounts:
            target.mkdir(parents=True, exist_ok=True)
            run(["mount", *args, str(target)])
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            run(["umount", "-l", str(target)], check=False)


def _repack(deb: Path, version: str, out: Path) -> Path:
    """The same package under a newer version: an upgrade without a second venv build."""
    work = out / f"repack-{version}"
    run(["dpkg-deb", "-R", str(deb), str(work)])
    control = work / "DEBIAN" / "control"
    text = control.read_text()
    old = next(ln for ln in text.splitlines() if ln.startswith("Version:"))
    control.write_text(text.replace(old, f"Version: {version}"))
    new = out / f"edgerund_{version}_test.deb"
    run(["dpkg-deb", "--root-owner-group", "--build", str(work), str(new)])
    shutil.rmtree(work)
    return new


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _run_daemon(root: Path, args: list[str], socket_rel: str, seconds: float,
                check_status: bool = True) -> dict[str, object] | None:
    """Start edgerund in the root, wait for its socket, ask status, stop it (SIGTERM)."""
    proc = subprocess.Popen(["chroot", str(root), "/usr/bin/edgerund", "run", *args],
                            env=CHROOT_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    status = None
    try:
        deadline = time.monotonic() + 90
        sock = root / socket_rel.lstrip("/")
        while time.monotonic() < deadline and not sock.exists():
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode}:\n{proc.stdout.read()}")
            time.sleep(0.2)
        assert sock.exists(), "daemon socket did not appear"
        time.sleep(seconds)
        if check_status:
            r = in_root(root, "/usr/bin/edgerunctl", "--socket", socket_rel, "--json", "status")
            status = json.loads(r.stdout)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, f"daemon exit {proc.returncode}:\n{out[-3000:]}"
    return status


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("dpkg-deb", "chroot", "mount"):
        require_binary(tool, "apt-get install dpkg-dev coreutils mount")
    out = tmp_path_factory.mktemp("deb")
    r = run([str(REPO / "packaging" / "build-deb.sh"), "--out", str(out)], timeout=1500)
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.exists() and path.name.endswith(".deb")
    return path


def test_build_refuses_unsupported_python(tmp_path: Path) -> None:
    # The script checks the *system* interpreter; prove the message with a fake one.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    script = (REPO / "packaging" / "build-deb.sh").read_text().replace(
        "PY=/usr/bin/python3", f"PY={fake_bin}/python3")
    (fake_bin / "python3").write_text("#!/bin/sh\n"
                                      "case \"$*\" in *version_info[0]*) echo 3.9;; "
                                      "*) exit 1;; esac\n")
    (fake_bin / "python3").chmod(0o755)
    shutil.copytree(REPO / "packaging", tmp_path / "repo" / "packaging")
    target = tmp_path / "repo" / "packaging" / "build-deb.sh"
    target.write_text(script)
    r = run(["bash", str(target)], check=False)
    assert r.returncode == 2
    assert "unsupported Python 3.9" in r.stderr


def test_install_upgrade_remove_purge(deb: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _make_root(root)
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    with mounted(root):
        # --- install
        shutil.copy(deb, root / "tmp" / "edgerund.deb")
        in_root(root, "apt-get", "update", "-q", timeout=600)
        r = in_root(root, "apt-get", "install", "-y", "-q", "/tmp/edgerund.deb", timeout=900)
        assert "edgerund" in r.stdout
        for path in ("opt/edgerund/bin/python", "usr/bin/edgerund", "usr/bin/edgerunctl",
                     "lib/systemd/system/edgerund.service", "usr/lib/sysusers.d/edgerund.conf",
                     "usr/lib/tmpfiles.d/edgerund.conf", "etc/edgerund/edgerund.yaml",
                     "usr/share/edgerund/models/reference/manifest.json",
                     "usr/share/man/man8/edgerund.8.gz"):
            assert (root / path).exists(), path
        assert in_root(root, "getent", "passwd", "edgerund").stdout.startswith("edgerund:")
        assert (root / "var/lib/edgerund").is_dir()
        conffiles = (root / "var/lib/dpkg/info/edgerund.conffiles").read_text()
        assert "/etc/edgerund/edgerund.yaml" in conffiles
        # No pip on the gateway: the venv carries everything, no pip inside it either.
        assert not list((root / "opt/edgerund/lib").glob("python3*/site-packages/pip"))

        r = in_root(root, "/usr/bin/edgerund", "check-config", "-c", "/etc/edgerund/edgerund.yaml")
        assert "OK" in r.stdout

        analyze = shutil.which("systemd-analyze")
        if analyze:
            va = run([analyze, "verify", f"--root={root}",
                      "/lib/systemd/system/edgerund.service"], check=False)
            errors = [ln for ln in (va.stdout + va.stderr).splitlines()
                      if "edgerund.service" in ln]
            assert not errors, "\n".join(errors)

        # --- simulated daemon in the root answers edgerunctl
        st = _run_daemon(root, ["--simulate"], "/tmp/edgerund-sim/diag.sock", 3.0)
        assert st is not None and st["simulate"] is True
        assert st["sensors"], "simulated sensors are reported"

        # --- the default config creates identity and model state under /var/lib/edgerund
        _run_daemon(root, ["-c", "/etc/edgerund/edgerund.yaml"], "/run/edgerund/diag.sock", 1.0)
        state = root / "var/lib/edgerund"
        before = _tree_digest(state)
        assert any(k.startswith("identity/") for k in before), sorted(before)
        conf = root / "etc/edgerund/edgerund.yaml"
        conf.write_text(conf.read_text() + "\n# site-specific edit kept across upgrades\n")
        conf_before = _sha(conf)

        # --- upgrade keeps config (modified conffile: Debian keeps the admin's), state
        newer = _repack(deb, deb.name.split("_")[1] + "+upgrade1", tmp_path)
        shutil.copy(newer, root / "tmp" / "edgerund-new.deb")
        in_root(root, "dpkg", "--force-confold", "-i", "/tmp/edgerund-new.deb")
        assert "+upgrade1" in in_root(root, "dpkg-query", "-W", "-f=${Version}",
                                      "edgerund").stdout
        assert _sha(conf) == conf_before
        after = _tree_digest(state)
        kept = {k: v for k, v in before.items() if k.startswith(("identity/", "models/"))}
        assert kept and all(after.get(k) == v for k, v in kept.items()), "state changed"

        # --- a broken config on upgrade: installed, not started, reason printed
        conf.write_text(conf.read_text() + "gateway_typo: 1\n")
        newest = _repack(deb, deb.name.split("_")[1] + "+upgrade2", tmp_path)
        shutil.copy(newest, root / "tmp" / "edgerund-newest.deb")
        r = in_root(root, "dpkg", "--force-confold", "-i", "/tmp/edgerund-newest.deb")
        assert "NOT starting the service" in r.stderr
        assert "gateway_typo" in r.stderr

        # --- remove keeps config and state; purge removes them
        in_root(root, "apt-get", "remove", "-y", "-q", "edgerund")
        assert not (root / "opt/edgerund/bin/python").exists()
        assert not (root / "usr/bin/edgerund").exists()
        assert conf.exists() and (state / "identity").exists()
        in_root(root, "apt-get", "purge", "-y", "-q", "edgerund")
        assert not (root / "etc/edgerund").exists()
        assert not state.exists()
        assert not (root / "opt/edgerund").exists()
