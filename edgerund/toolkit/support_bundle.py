"""`edgerunctl support-bundle -o FILE`: everything a remote engineer needs, in a tar.gz.

Contents: versions (edgerund, Python, OS, kernel, installed Python packages), the config
with secrets redacted, `status`, recent logs from the daemon's ring, the check report,
model states and update history, telemetry/spool statistics, metrics, and the unit's
journal where `journalctl` is readable. It never contains key material: no file is copied
from the state or identity directories, values of secret-looking config keys are replaced
by "<redacted>", and every member is scanned for PEM private keys before it is written
(a hit aborts the bundle rather than leak).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from edgerund import __version__
from edgerund.ctl.client import DiagClient, Unreachable
from edgerund.errors import CommandError, EdgerundError
from edgerund.toolkit.check import run_checks

SECRET_KEY = re.compile(
    r"(pass(word|phrase)?|secret|token|auth(?!ority)|private|psk|pin)", re.IGNORECASE
)
PRIVATE_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----")


class SecretLeak(EdgerundError):
    pass


def redact(node: Any) -> Any:
    """Replace values of secret-looking keys (paths to key files are kept: they are
    where, not what)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if (
                isinstance(k, str)
                and SECRET_KEY.search(k)
                and not k.endswith(("_file", "_path"))
                and not isinstance(v, (dict, list))
                and v not in (None, "", False)
            ):
                out[k] = "<redacted>"
            else:
                out[k] = redact(v)
        return out
    if isinstance(node, list):
        return [redact(x) for x in node]
    return node


def _versions() -> dict[str, Any]:
    os_release = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                os_release[k] = v.strip('"')
    except OSError:
        pass
    packages = sorted(
        f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]
    )
    return {
        "edgerund": __version__,
        "python": sys.version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "os": os_release.get("PRETTY_NAME"),
        "kernel": platform.release(),
        "packages": packages,
    }


def _journal() -> str | None:
    exe = shutil.which("journalctl")
    if not exe:
        return None
    try:
        r = subprocess.run(
            [exe, "-u", "edgerund", "-n", "2000", "--no-pager", "-o", "short-iso"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else f"journalctl failed: {r.stderr.strip()}"


def collect(client: DiagClient, config_path: Path) -> dict[str, bytes]:
    members: dict[str, Any] = {"versions.json": _versions()}
    st: dict[str, Any] | None = None
    error = None
    try:
        st = client.call("status")
    except (Unreachable, CommandError) as exc:
        error = str(exc)
    members["status.json"] = st if st is not None else {"error": error}
    if st is not None:
        for cmd, args, name in (
            ("log", {"n": 2000}, "log.json"),
            ("models", {}, "models.json"),
            ("telemetry", {}, "telemetry.json"),
            ("metrics", {}, "metrics.prom"),
        ):
            try:
                result = client.call(cmd, args)
            except (Unreachable, CommandError) as exc:
                result = {"error": str(exc)}
            members[name] = (
                result["text"]
                if name.endswith(".prom") and isinstance(result, dict) and "text" in result
                else result
            )
        cfg_path = Path(str(st.get("config_path") or config_path))
    else:
        cfg_path = config_path
    try:
        raw = yaml.safe_load(cfg_path.read_text())
        members["config.redacted.yaml"] = yaml.safe_dump(redact(raw), sort_keys=False)
    except (OSError, yaml.YAMLError) as exc:
        members["config.redacted.yaml"] = f"# could not read {cfg_path}: {exc}\n"
    members["check.json"] = [r.to_dict() for r in run_checks(cfg_path, st, error)]
    journal = _journal()
    if journal is not None:
        members["journal.txt"] = journal
    out: dict[str, bytes] = {}
    for name, value in members.items():
        data = (
            value.encode()
            if isinstance(value, str)
            else json.dumps(value, indent=2, default=str).encode()
        )
        if PRIVATE_PEM.search(data):
            raise SecretLeak(f"{name} contains a private key; refusing to write the bundle")
        out[name] = data
    return out


def open_private(path: Path) -> BinaryIO:
    """A new file at `path`, mode 0600 from its creation (no window in which the umask
    leaves it readable by others), never through a symlink, never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by the umask: never widened, made exact
    return os.fdopen(fd, "wb")


def write_bundle(path: Path, members: dict[str, bytes]) -> None:
    """Write the tar.gz to `path.part` (created private) and rename it into place."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    top = f"edgerund-support-{stamp}"
    tmp = path.with_name(path.name + ".part")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of an interrupted run (unlink never follows a symlink)
    try:
        with open_private(tmp) as raw, tarfile.open(fileobj=raw, mode="w:gz") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size = len(data)
                info.mtime = int(time.time())
                info.mode = 0o600
                tf.addfile(info, io.BytesIO(data))
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
