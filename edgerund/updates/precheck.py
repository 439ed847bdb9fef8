"""Health precheck of a staged model, run in a SUBPROCESS with a timeout.

A model that segfaults onnxruntime, allocates without bound or loops forever must not take
the daemon down, so the daemon never loads an unchecked model in-process: it starts
`python -I -c <bootstrap> PACKAGE_ROOT` (isolated mode: the working directory and
PYTHONPATH are not on the child's import path, the package directory is passed explicitly;
it then runs this module as __main__), writes one JSON request on stdin and reads one JSON
verdict from the last stdout line. The child runs in its own session (killed as a group on
timeout), with RLIMIT_CPU as a second line of defence and no core dumps.

The child checks, in order, each failure with its own reason code:
  load          onnxruntime loads the model (tiny-model session options)   precheck_load
  abi           graph inputs/outputs match the manifest's io_signature     abi_mismatch
  golden        every golden input gives finite outputs ...                nan_output
                ... within allclose(atol, rtol) of the expected outputs    golden_mismatch
  latency       p95 over N runs (after warm-up) <= latency_p95_ms          latency_budget
                and median <= max_rel_latency x the current model's median,
                measured interleaved in the same process                   latency_regression
  runner        the inference runtime's own ModelRunner.load() accepts the
                slot (its manifest/ABI checks), when the slot carries one   runner_load
  must-detect   a CALIBRATED slot (X+cal.N, edgerund.inference.overlay): every
                must-detect vector scores above the overlay's threshold under its
                normalisation                                              must_detect_lost
                (its golden-io file is optional: the runner check above reproduces the
                golden vectors under the signed normalisation, applies the overlay and
                reruns the golden inputs under it: features re-expressed, scores finite)
The parent adds precheck_timeout (killed after the wall-clock timeout) and
precheck_crashed (the child died from a signal or exited without a verdict).

Golden file format (`health.golden_file`, default golden-io.npz): for every graph input X an
array `in.X` and for every graph output Y an array `out.Y`, each with a leading sample axis
(sample i feeds `in.X[i]`, expects `out.Y[i]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

import edgerund
from edgerund.errors import EdgerundError
from edgerund.updates.abi import ORT_DTYPES, IoSignature
from edgerund.updates.manifest import Health


@dataclass(frozen=True)
class PrecheckResult:
    ok: bool
    reason: str = ""
    message: str = ""
    figures: dict[str, Any] | None = None


class _Fail(EdgerundError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _session(path: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _check_abi(sess: Any, sig: dict[str, Any]) -> None:
    for kind, got in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        want = sig[kind]
        got_desc = [(g.name, ORT_DTYPES.get(g.type, g.type), list(g.shape)) for g in got]
        want_desc = [(w["name"], w["dtype"], list(w["shape"])) for w in want]
        if [g[0] for g in got_desc] != [w[0] for w in want_desc]:
            raise _Fail(
                "abi_mismatch",
                f"{kind} names: manifest {[w[0] for w in want_desc]}, model {[g[0] for g in got_desc]}",
            )
        for (gn, gt, gs), (_, wt, ws) in zip(got_desc, want_desc, strict=True):
            if gt != wt:
                raise _Fail("abi_mismatch", f"{kind[:-1]} {gn!r} dtype: manifest {wt}, model {gt}")
            dims_ok = len(gs) == len(ws) and all(
                (not isinstance(w, int)) or g == w for g, w in zip(gs, ws, strict=True)
            )
            if not dims_ok:
                raise _Fail("abi_mismatch", f"{kind[:-1]} {gn!r} shape: manifest {ws}, model {gs}")


def _zeros_feed(sess: Any) -> dict[str, Any]:
    import numpy as np

    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feed[i.name] = np.zeros(shape, dtype=ORT_DTYPES.get(i.type, "float32"))
    return feed


def _p95_ms(samples: list[float]) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(0.95 * len(s)))] * 1e3


def check(req: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    slot = Path(req["dir"])
    health = req["health"]
    figures: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        sess = _session(str(slot / "model.onnx"))
    except Exception as exc:
        raise _Fail("precheck_load", f"onnxruntime could not load model.onnx: {exc}") from None
    figures["load_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    _check_abi(sess, req["io_signature"])
    calibrated = bool(req.get("calibration"))
    if calibrated and not (slot / health["golden_file"]).exists():
        return _check_runner(slot, figures, calibrated)
    try:
        golden = np.load(slot / health["golden_file"], allow_pickle=False)
    except Exception as exc:
        raise _Fail("golden_mismatch", f"golden file unreadable: {exc}") from None
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    missing = [f"in.{n}" for n in in_names if f"in.{n}" not in golden] + [
        f"out.{n}" for n in out_names if f"out.{n}" not in golden
    ]
    if missing:
        raise _Fail("golden_mismatch", f"golden file lacks arrays {missing}")
    n = int(golden[f"in.{in_names[0]}"].shape[0])
    if n < 1:
        raise _Fail("golden_mismatch", "golden file holds no samples")
    worst = 0.0
    for i in range(n):
        feed = {k: np.ascontiguousarray(golden[f"in.{k}"][i]) for k in in_names}
        try:
            outs = sess.run(out_names, feed)
        except Exception as exc:
            raise _Fail("precheck_load", f"inference failed on golden sample {i}: {exc}") from None
        for name, got in zip(out_names, outs, strict=True):
            got = np.asarray(got)
            want = golden[f"out.{name}"][i]
            if got.dtype.kind in "fc" and not np.all(np.isfinite(got)):
                raise _Fail("nan_output", f"output {name!r} is not finite on golden sample {i}")
            if got.shape != want.shape:
                raise _Fail(
                    "golden_mismatch", f"output {name!r} shape {got.shape}, golden {want.shape}"
                )
            g64, w64 = got.astype(np.float64), want.astype(np.float64)
            if not np.allclose(g64, w64, atol=health["atol"], rtol=health["rtol"]):
                err = float(np.max(np.abs(g64 - w64)))
                raise _Fail(
                    "golden_mismatch",
                    f"output {name!r} sample {i}: max |error| {err:.3g} exceeds atol {health['atol']}"
                    f" + rtol {health['rtol']}",
                )
            if g64.size:
                worst = max(worst, float(np.max(np.abs(g64 - w64))))
    figures["golden_samples"] = n
    figures["golden_max_abs_err"] = worst
    # Latency: candidate and (optional) current model interleaved in this process.
    feed0 = {k: np.ascontiguousarray(golden[f"in.{k}"][0]) for k in in_names}
    base_sess = None
    if req.get("baseline"):
        with contextlib.suppress(Exception):
            base_sess = _session(str(Path(req["baseline"]) / "model.onnx"))
    base_feed = _zeros_feed(base_sess) if base_sess is not None else None
    for _ in range(5):
        sess.run(out_names, feed0)
        if base_sess is not None:
            base_sess.run(None, base_feed)
    cand: list[float] = []
    base: list[float] = []
    for _ in range(int(req.get("runs", 50))):
        t = time.perf_counter()
        sess.run(out_names, feed0)
        cand.append(time.perf_counter() - t)
        if base_sess is not None:
            t = time.perf_counter()
            base_sess.run(None, base_feed)
            base.append(time.perf_counter() - t)
    p95 = _p95_ms(cand)
    figures["latency_p95_ms"] = round(p95, 4)
    if p95 > health["latency_p95_ms"]:
        raise _Fail(
            "latency_budget",
            f"latency p95 {p95:.3f} ms exceeds the budget {health['latency_p95_ms']} ms",
        )
    if base:
        # The ratio compares medians: a p95 on a shared CPU is dominated by preemption
        # spikes that hit either model at random; the median reflects the model's cost.
        c50 = sorted(cand)[len(cand) // 2] * 1e3
        b50 = sorted(base)[len(base) // 2] * 1e3
        figures["baseline_p50_ms"] = round(b50, 4)
        figures["latency_p50_ms"] = round(c50, 4)
        # A floor of 0.2 ms keeps scheduler noise on microsecond models from deciding.
        ratio = c50 / max(b50, 0.2)
        figures["latency_ratio"] = round(ratio, 3)
        if ratio > health["max_rel_latency"]:
            raise _Fail(
                "latency_regression",
                f"median latency {c50:.3f} ms is {ratio:.2f}x the current model's {b50:.3f} ms"
                f" (max {health['max_rel_latency']}x)",
            )
    return _check_runner(slot, figures, calibrated)


def _check_runner(slot: Path, figures: dict[str, Any], calibrated: bool) -> dict[str, Any]:
    if (slot / "manifest.json").exists():
        runner_cls = _find_runner()
        if runner_cls is not None:
            try:
                runner_cls.load(slot)
            except Exception as exc:
                raise _Fail("runner_load", f"ModelRunner refused the model: {exc}") from None
            figures["runner_checked"] = True
    if calibrated:
        from edgerund.inference.calibration import CalibrationRefused
        from edgerund.inference.overlay import check_must_detect_under

        try:
            figures["must_detect"] = check_must_detect_under(slot)
        except CalibrationRefused as exc:
            raise _Fail(exc.reason, exc.detail) from None
    return figures


def _find_runner() -> Any:
    """The inference runtime's ModelRunner (None when the runtime cannot be imported)."""
    try:
        from edgerund.inference.runner import ModelRunner
    except ImportError:
        return None
    return ModelRunner


def main() -> int:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        cpu = os.environ.get("EDGERUND_PRECHECK_CPU_S")
        if cpu:
            lim = max(1, int(float(cpu)))
            resource.setrlimit(resource.RLIMIT_CPU, (lim, lim + 1))
    except (ImportError, ValueError, OSError):
        pass
    req = json.loads(sys.stdin.buffer.read())
    try:
        figures = check(req)
        out: dict[str, Any] = {"ok": True, "figures": figures}
    except _Fail as f:
        out = {"ok": False, "reason": f.reason, "message": f.message}
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


def child_argv(package_root: Path) -> list[str]:
    """The precheck child's command line. `-I` (isolated mode): neither the working
    directory nor PYTHONPATH/PYTHON* variables nor the user site reach the child's import
    path, so a module planted in the daemon's working directory (`numpy.py`) is never
    executed. The package is found through the one directory we pass explicitly."""
    bootstrap = (
        "import sys, runpy; sys.path.insert(0, sys.argv.pop(1)); "
        "runpy.run_module('edgerund.updates.precheck', run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-I", "-c", bootstrap, str(package_root)]


PACKAGE_ROOT = Path(edgerund.__file__).resolve().parent.parent
"""The directory that holds the `edgerund` package this daemon runs from."""


async def run_precheck(
    slot_dir: Path,
    baseline_dir: Path | None,
    io_signature: IoSignature,
    health: Health,
    *,
    timeout_s: float,
    cpu_s: float,
    runs: int,
    calibration: bool = False,
) -> PrecheckResult:
    """Run the precheck child and turn its end into a result (never raises for model
    faults)."""
    req = json.dumps(
        {
            "dir": str(slot_dir),
            "baseline": str(baseline_dir) if baseline_dir else None,
            "io_signature": msgspec.to_builtins(io_signature),
            "health": msgspec.to_builtins(health),
            "runs": runs,
            "calibration": calibration,
        }
    ).encode()
    env = dict(os.environ)
    env["EDGERUND_PRECHECK_CPU_S"] = str(cpu_s)
    env.setdefault("OMP_NUM_THREADS", "1")
    argv = child_argv(PACKAGE_ROOT)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(req), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return PrecheckResult(
            False,
            "precheck_timeout",
            f"precheck did not finish within {timeout_s} s (model hangs the runtime?)",
        )
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    rc = proc.returncode
    if rc is not None and rc < 0:
        return PrecheckResult(
            False, "precheck_crashed", f"precheck died from signal {signal.Signals(-rc).name}"
        )
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    try:
        verdict = json.loads(lines[-1])
        assert isinstance(verdict, dict)
    except (IndexError, ValueError, AssertionError):
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return PrecheckResult(
            False, "precheck_crashed", f"precheck exited {rc} without a verdict: {' | '.join(tail)}"
        )
    if verdict.get("ok"):
        return PrecheckResult(True, figures=verdict.get("figures"))
    return PrecheckResult(
        False, str(verdict.get("reason", "precheck_failed")), str(verdict.get("message", ""))
    )


if __name__ == "__main__":
    sys.exit(main())
