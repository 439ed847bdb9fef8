"""The set of active model runners, by name, with atomic swaps.

Theory of operation
-------------------
Control loops call `registry.runner(name)` on every tick. The registry keeps one dict
from model name to a *fully loaded* `ModelRunner`; a swap builds the new runner completely
(manifest, session, ABI check, warm-up, golden vectors) in a worker thread, and only then
replaces the dict entry with one assignment on the event loop. A lookup therefore returns
either the old runner or the new one, never one being loaded, and a swap takes effect
between two ticks (ticks run on the same event loop). A failed load raises `ModelError`
and leaves the old runner in place.

Swaps of one model are serialised by a per-model lock (two updates racing cannot
interleave their loads). The replaced runner is closed after the swap; a call that is
still running on its dedicated thread finishes first.

Per model the registry keeps a small state for `status`: "loading", "running", "failed"
(no runner: the start-up load failed), plus the directory it came from and the last
error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from edgerund.inference.config import ModelConfig
from edgerund.inference.errors import ModelError
from edgerund.inference.runner import ModelRunner
from edgerund.ports import ModelCounters

log = structlog.get_logger("edgerund.inference")

__all__ = ["ModelRegistry", "ModelState"]


@dataclass
class ModelState:
    config: ModelConfig
    state: str = "loading"  # loading | running | swapping | failed
    model_dir: Path | None = None
    last_error: str | None = None
    swaps: int = 0
    failed_swaps: int = 0


Loader = Callable[[Path, ModelConfig], ModelRunner]


def default_loader(model_dir: Path, cfg: ModelConfig) -> ModelRunner:
    return ModelRunner.load(
        model_dir,
        latency_budget_us=cfg.latency_budget_ms * 1000.0,
        warmup_runs=cfg.warmup_runs,
        check_golden=cfg.check_golden,
        providers=cfg.providers,
    )


class ModelRegistry:
    """name -> active ModelRunner. All methods are called on the event loop."""

    def __init__(self, configs: Sequence[ModelConfig], loader: Loader = default_loader) -> None:
        self._runners: dict[str, ModelRunner] = {}
        self._states = {c.name: ModelState(c) for c in configs}
        self._locks = {c.name: asyncio.Lock() for c in configs}
        self._loader = loader

    @property
    def names(self) -> list[str]:
        return list(self._states)

    def runner(self, name: str) -> ModelRunner | None:
        return self._runners.get(name)

    def state(self, name: str) -> ModelState:
        try:
            return self._states[name]
        except KeyError:
            raise ModelError(
                f"unknown model {name!r} (configured: {sorted(self._states)})", code="unknown_model"
            ) from None

    async def load(self, name: str, model_dir: Path) -> ModelRunner:
        """The first load of `name` (start-up). Raises ModelError; state becomes 'failed'."""
        st = self.state(name)
        async with self._locks[name]:
            st.state = "loading"
            try:
                runner = await asyncio.to_thread(self._loader, model_dir, st.config)
            except ModelError as exc:
                st.state, st.last_error = "failed", str(exc)
                raise
            except Exception as exc:  # an OS error or a bug while loading: same outcome
                st.state, st.last_error = "failed", f"{type(exc).__name__}: {exc}"
                raise ModelError(f"loading {model_dir} failed: {exc!r}", code="load") from exc
            self._install(st, runner, model_dir)
            return runner

    async def swap(self, name: str, model_dir: Path) -> ModelRunner:
        """Load `model_dir` off the loop, then make it the active runner of `name`.

        On failure the old runner stays active and ModelError is raised."""
        st = self.state(name)
        async with self._locks[name]:
            previous_state = st.state
            st.state = "swapping" if name in self._runners else "loading"
            try:
                runner = await asyncio.to_thread(self._loader, Path(model_dir), st.config)
            except ModelError as exc:
                st.failed_swaps += 1
                st.last_error = str(exc)
                st.state = previous_state if name in self._runners else "failed"
                log.warning("model_swap_failed", model=name, dir=str(model_dir), error=str(exc))
                raise
            except Exception as exc:  # a bug or an OS error in loading: same outcome
                st.failed_swaps += 1
                st.last_error = f"{type(exc).__name__}: {exc}"
                st.state = previous_state if name in self._runners else "failed"
                log.error("model_swap_failed", model=name, dir=str(model_dir), error=repr(exc))
                raise ModelError(f"loading {model_dir} failed: {exc!r}", code="load") from exc
            old = self._runners.get(name)
            self._install(st, runner, Path(model_dir))
            st.swaps += 1
            if old is not None:
                old.close()
            log.info(
                "model_swapped",
                model=name,
                version=runner.version,
                previous=None if old is None else old.version,
                dir=str(model_dir),
            )
            return runner

    def _install(self, st: ModelState, runner: ModelRunner, model_dir: Path) -> None:
        # One dict assignment on the event loop: the atomic step of a swap.
        self._runners[st.config.name] = runner
        st.state, st.model_dir, st.last_error = "running", model_dir, None
        choice = runner.providers
        for provider, reason in choice.fallbacks:
            log.warning(
                "model_provider_fallback",
                model=st.config.name,
                provider=provider,
                reason=reason,
                using=choice.active,
            )
        log.info("model_provider", model=st.config.name, provider=choice.active)

    def counters(self, name: str) -> ModelCounters:
        """The active runner's monotonic counters (zeros before any runner). A swap
        starts a new runner from zero, which probation sees as its own window's start."""
        self.state(name)  # ModelError for an unknown model
        r = self._runners.get(name)
        if r is None:
            return ModelCounters(inferences=0, faults=0, nan_outputs=0, score_mean=None)
        return ModelCounters(
            inferences=r.inferences,
            faults=r.faults,
            nan_outputs=r.nan_outputs,
            score_mean=r.score_mean(),
            input_faults=r.input_faults,
        )

    def stats(self, name: str) -> dict[str, Any]:
        """Everything about one model, for display (`models` command)."""
        st = self.state(name)
        r = self._runners.get(name)
        out: dict[str, Any] = r.stats() if r is not None else {"name": name}
        out.update(
            state=st.state,
            model_dir=None if st.model_dir is None else str(st.model_dir),
            last_error=st.last_error,
            swaps=st.swaps,
            failed_swaps=st.failed_swaps,
        )
        return out

    def close(self) -> None:
        for r in self._runners.values():
            r.close()
        self._runners.clear()
