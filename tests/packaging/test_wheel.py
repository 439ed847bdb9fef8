"""The wheel on its own runs the simulator: `pip install edgerund-*.whl`, then
`edgerund run --simulate`, from outside the checkout.

The wheel carries the reference model and the development keyring as data files
(`<prefix>/share/edgerund/models/...`, pyproject's [tool.setuptools.data-files]), and
`share_dir()` finds them under the installed prefix. The test, offline as every test:

- builds the wheel from a copy of the sources (`pip wheel --no-build-isolation`, with
  the setuptools and wheel of the test's own environment; no checkout is written to);
- creates a fresh venv with the base interpreter (pip from ensurepip, which is bundled)
  and installs the wheel with `pip install --no-deps --no-index`: the package files,
  entry points and data files are pip's work, from the wheel alone;
- makes the dependencies importable by one `.pth` line naming the test environment's
  site-packages (there is no index to install them from). A `.pth` *line* only extends
  sys.path: the editable-install hooks in that directory are not run, so `edgerund`
  itself can only come from the wheel, which the test asserts;
- runs `edgerund run --simulate` in that venv with the checkout nowhere on its path, in a
  private mount namespace whose /tmp/edgerund-sim (the simulated config's run and state
  directory) is a directory of its own, so that parallel runs do not collide; then
  `edgerunctl status` through the socket, and SIGTERM: exit 0.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from tests.fixtures.binaries import require_binary

REPO = Path(__file__).resolve().parents[2]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "edgerund",
    "drivers",
    "models/reference/manifest.json",
    "models/reference/model.onnx",
    "models/reference/golden.npz",
    "models/dev-keys/keyring.dev.json",
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r  # type: ignore[no-any-return]


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    for rel in SOURCES:
        p = REPO / rel
        if p.is_dir():
            shutil.copytree(p, src / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, src / rel)
    dist = tmp / "dist"
    _run(
        [
            sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
            "--no-index", "-w", str(dist), str(src),
        ],
        cwd=tmp,
    )  # fmt: skip
    (wheel,) = dist.glob("edgerund-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    env = tmp / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(env)], cwd=tmp)
    py = env / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp)
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_the_simulator_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    data = "edgerund-0.1.0.data/data/share/edgerund/models/"
    for f in ("reference/manifest.json", "reference/model.onnx", "reference/golden.npz"):
        assert data + f in names, (f, names)
    assert data + "dev-keys/keyring.dev.json" in names
    assert not [n for n in names if n.endswith(".key")], "a private key in the wheel"
    assert "edgerund/data/simulate.yaml" in names


def test_pip_installed_wheel_runs_the_simulator(wheel: Path, tmp_path: Path) -> None:
    unshare = require_binary("unshare", "apt-get install util-linux")
    env = _fresh_venv(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    clean_env = {
        "PATH": f"{env / 'bin'}:/usr/bin:/bin",
        "HOME": str(outside),
        "LANG": "C.UTF-8",
    }  # no PYTHONPATH, no EDGERUND_SHARE: only what pip installed
    where = _run(
        [
            str(env / "bin" / "python"), "-c",
            "import edgerund, edgerund.config.loader as l; print(edgerund.__file__); "
            "print(l.share_dir())",
        ],
        cwd=outside, env=clean_env,
    ).stdout.split()  # fmt: skip
    assert where[0].startswith(str(env)), where  # the wheel's copy, not the checkout's
    assert where[1] == str(env / "share" / "edgerund"), where

    private = tmp_path / "sim"
    private.mkdir()
    Path("/tmp/edgerund-sim").mkdir(exist_ok=True)  # the mount point (left empty)
    script = (
        f"mount --bind {private} /tmp/edgerund-sim && "
        f"exec {env / 'bin' / 'edgerund'} run --simulate"
    )
    proc = subprocess.Popen(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=outside,
        env=clean_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ctl = [str(env / "bin" / "edgerunctl"), "--socket", str(private / "diag.sock"), "--json"]
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                if "unshare failed" in out or "mount:" in out:
                    pytest.skip(f"no private mount namespace here: {out[-300:]}")
                raise AssertionError(f"the daemon exited {proc.returncode}:\n{out[-4000:]}")
            r = subprocess.run(
                [*ctl, "status"], capture_output=True, text=True, env=clean_env, cwd=outside
            )
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, f"no READY in 120 s: {r.stderr}"
            time.sleep(0.5)
        st = json.loads(r.stdout)
        assert st["simulate"] is True and st["sensors"], st
        (model,) = st["models"]
        assert model["name"] == "motor-ae" and model["version"], model  # loaded from the wheel
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out[-4000:]
