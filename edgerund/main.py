"""The daemon's process: load and check, choose the event loop, run the root, exit codes.

`run` never raises for bad input: a config that does not validate, a state directory the
service user cannot write, or a component that refuses to start (ConfigError, DeviceError)
is logged and exits 2, which the unit's `RestartPreventExitStatus=2` keeps systemd from
restarting into the same refusal; a crash exits 1 (systemd restarts it). Before any
component is built the applied desired state is re-verified from its signature
(twin/applier.py `load_applied`), and the simulator's default /tmp directories are made
ours alone. The event loop is uvloop's where installed (`daemon.use_uvloop`), and its
default executor is started whole before the root runs (edgerund/workers.py).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import structlog

from edgerund import __version__, logs, workers
from edgerund.config.loader import load_config
from edgerund.config.schema import Config
from edgerund.daemon import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, Daemon
from edgerund.errors import ConfigError, DeviceError
from edgerund.private_dirs import ensure_private_dir
from edgerund.twin.applier import load_applied, load_offered
from edgerund.twin.desired import Desired

log = structlog.get_logger("edgerund")


def _private_sim_dirs(cfg: Config) -> None:
    """The simulator's run, socket and state dirs default to /tmp: ours alone (0700)."""
    dirs = {
        "paths.run_dir": Path(cfg.paths.run_dir),
        "diag.socket": Path(cfg.diag.socket).parent,
        "paths.state_dir": Path(cfg.paths.state_dir),
    }
    for key, d in sorted(dirs.items(), key=lambda kv: len(kv[1].parts)):
        ensure_private_dir(d, key)


def _check_state_dir(cfg: Config) -> None:
    state = Path(cfg.paths.state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o750)
        probe = state / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"state directory {state} is not writable: {exc.strerror} "
            "(the service user must own it; see systemd StateDirectory=)",
            path="paths.state_dir",
        ) from None


def run(config_path: str | os.PathLike[str], *, simulate: bool = False) -> int:
    """Load, validate and run. Returns the process exit code; never raises for bad input."""
    path = Path(config_path)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        logs.configure()
        log.error("config_invalid", error=str(exc))
        return EXIT_CONFIG
    if simulate and not cfg.simulation.enabled:
        cfg.simulation.enabled = True
    logs.configure(cfg.logging.level, cfg.logging.format, cfg.logging.ring_size)
    try:
        if simulate or cfg.simulation.enabled:
            _private_sim_dirs(cfg)
        _check_state_dir(cfg)
    except ConfigError as exc:
        log.error("startup_refused", error=str(exc))
        return EXIT_CONFIG
    # The desired state applied before, re-verified from its signature (twin/applier.py).
    applied: Desired | None = None
    offered: Desired | None = None  # newer than `applied`: its model targets pin
    if cfg.twin.enabled:
        cfg, applied, _ = load_applied(cfg, path)
        offered = load_offered(cfg, applied)
        if simulate and not cfg.simulation.enabled:
            cfg.simulation.enabled = True
    runner_kwargs: dict[str, Any] = {}
    if cfg.daemon.use_uvloop:
        try:
            import uvloop

            runner_kwargs["loop_factory"] = uvloop.new_event_loop
        except ImportError:
            pass
    daemon_holder: list[Daemon] = []

    async def main() -> int:
        workers.install(asyncio.get_running_loop())  # threads constant from READY on
        d = Daemon(
            path,
            cfg,
            simulate=simulate or cfg.simulation.enabled,
            applied=applied,
            offered=offered,
        )
        daemon_holder.append(d)
        return await d.run()

    log.info(
        "starting",
        version=__version__,
        config=str(path),
        simulate=simulate,
        event_loop="uvloop" if runner_kwargs else "asyncio",
    )
    try:
        with asyncio.Runner(**runner_kwargs) as runner:
            return runner.run(main())
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        leaves = _leaves(exc)
        refused = [e for e in leaves if isinstance(e, (ConfigError, DeviceError))]
        if refused:
            for r in refused:
                log.error("startup_refused", error=str(r))
            return EXIT_CONFIG
        for e in leaves:
            log.error("daemon_crashed", error=repr(e), exc_info=e)
        return EXIT_FAILURE


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out.extend(_leaves(e))
        return out
    return [exc]
