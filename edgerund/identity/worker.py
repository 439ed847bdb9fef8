"""One thread owning one ESAPI context: every TPM command runs there.

Why a single thread: an ESYS context is not thread-safe (tpm2-tss #2926) and a TPM executes
one command at a time anyway, so one thread with a job queue serializes commands without
locks and keeps the event loop free (tpm2-pytss releases the GIL inside libtss2 calls;
measured worst loop stall 1.8 ms through a worker vs 60-160 ms inline during RSA key
creation).

Jobs are plain functions `fn(ectx) -> T`. A job that creates transient objects or sessions
must flush them in `finally` (a TPM without a resource manager has ~3 object slots), so a
cancelled caller never leaks a slot: cancellation only abandons the *result*, the job
itself always runs to completion on the worker thread.

Back-pressure: at most `max_queued` calls may be queued or running. One more is refused at
once with `TpmBusy` (code `busy`), so a burst of clients cannot build an unbounded backlog
whose tail would time out anyway.

Timeouts measure EXECUTION only. The worker thread tells the loop when it starts a job; the
loop then arms a watchdog of `call_timeout_ms` (or the call's own `timeout_ms`). Time spent
queued behind other jobs never counts, so a burst of healthy calls cannot make one of them
"time out". The watchdog belongs to the worker, not to the caller: a job whose caller went
away is still bounded.

Recovery: libtss2's synchronous ESYS calls retry internally on TRY_AGAIN, so a TPM that stops
answering can keep the worker thread inside libtss2 indefinitely. When the watchdog fires, the
current *generation* (thread + ESAPI context + TCTI) is abandoned: its queued calls fail with
a DeviceError, and its thread, once libtss2 returns, closes its own context and exits (a
context is only ever touched by the thread that created it). The next call opens a NEW
generation (new TCTI, new ESAPI, then `on_reopen(ectx)` re-attaches the persistent objects)
and proceeds; a failed reopen is retried no more often than every `reopen_backoff_s`, and
calls in between fail fast naming the last error. Threads are daemon threads (not a
ThreadPoolExecutor, whose threads are joined at interpreter exit), so a hung TPM can never
keep the daemon from exiting.

TSS errors are translated into DeviceErrors whose messages say what to do (tpm_errors.py).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from edgerund.errors import DeviceError
from edgerund.identity.tpm_errors import LAYER_MASK, TCTI_LAYER, TpmError

os.environ.setdefault("TSS2_LOG", "all+NONE")  # libtss2 logs ERRORs for expected failures

log = structlog.get_logger("edgerund.identity")

T = TypeVar("T")
MAX_ABANDONED_THREADS = 4  # hung generations we tolerate before refusing to open more


class TpmBusy(DeviceError):
    """The TPM call queue is full: try again later (socket error code `busy`)."""

    code = "busy"


@dataclass(eq=False)
class _Job:
    fn: Callable[[Any], Any]
    what: str
    needs_ctx: bool
    timeout_s: float
    loop: asyncio.AbstractEventLoop
    fut: asyncio.Future[Any]
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Generation:
    """One thread + its ESAPI context. Only its own thread touches `ectx`/`tcti`."""

    number: int
    jobs: queue.SimpleQueue[_Job | None] = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None
    ectx: Any = None
    tcti: Any = None
    abandoned: bool = False
    running: _Job | None = None


class TpmWorker:
    def __init__(
        self,
        tcti: str,
        call_timeout_ms: int,
        *,
        max_queued: int = 32,
        reopen_backoff_s: float = 2.0,
        on_reopen: Callable[[Any], None] | None = None,
    ) -> None:
        self.tcti = tcti
        self.call_timeout_ms = call_timeout_ms
        self.max_queued = max_queued
        self.reopen_backoff_s = reopen_backoff_s
        self.on_reopen = on_reopen
        self._gen_count = 0
        self._gen = self._new_generation()
        self._abandoned: list[_Generation] = []
        self._pending = 0
        self._broken: str | None = None  # why the current generation was abandoned
        self._next_reopen = 0.0
        self._reopen_lock: asyncio.Lock | None = None
        self._opened = False
        self.calls = 0
        self.errors = 0
        self.busy_refusals = 0
        self.timeouts = 0
        self.reopens = 0

    # -- facts

    @property
    def thread_id(self) -> int | None:
        t = self._gen.thread
        return t.ident if t is not None else None

    @property
    def wedged(self) -> bool:
        """True while the context is abandoned and not yet reopened."""
        return self._broken is not None

    @property
    def current_context(self) -> Any:
        """The live ESAPI context. Only for the benchmark's inline (on-loop) baseline."""
        return self._gen.ectx

    @property
    def pending(self) -> int:
        return self._pending

    def status(self) -> dict[str, Any]:
        return {
            "tpm_calls": self.calls,
            "tpm_errors": self.errors,
            "tpm_busy_refusals": self.busy_refusals,
            "tpm_timeouts": self.timeouts,
            "tpm_reopens": self.reopens,
            "tpm_pending": self._pending,
            "tpm_hung_threads": sum(1 for g in self._abandoned if _alive(g)),
            "tpm_state": "recovering" if self._broken else "ok",
            "tpm_last_failure": self._broken,
        }

    # -- the threads

    def _new_generation(self) -> _Generation:
        self._gen_count += 1
        return _Generation(self._gen_count)

    def _thread_main(self, gen: _Generation) -> None:
        while True:
            job = gen.jobs.get()
            if job is None:
                break
            if gen.abandoned:
                # Taken off the queue after the loop abandoned this generation but before
                # its drain got to it: answer it (a job dropped here was never answered and
                # its caller, the uplink's session, waited for ever: soak, 2026-12-06). The
                # drain puts None at the end of the queue, which ends this thread.
                _post(job.loop, self._refuse_abandoned, job)
                continue
            if job.fut.done():  # failed while queued (abandoned generation)
                continue
            gen.running = job
            _post(job.loop, self._on_start, gen, job)
            try:
                result = self._run(gen, job)
            except BaseException as exc:  # delivered to the awaiting caller
                _post(job.loop, self._on_done, gen, job, None, exc)
            else:
                _post(job.loop, self._on_done, gen, job, result, None)
            gen.running = None
            if gen.abandoned:
                break
        if gen.abandoned:  # nobody else may touch this context: finalize it here
            _close_context(gen)

    def _ensure_thread(self, gen: _Generation) -> None:
        if gen.thread is None:
            gen.thread = threading.Thread(
                target=self._thread_main, args=(gen,), name=f"tpm-{gen.number}", daemon=True
            )
            gen.thread.start()

    def _run(self, gen: _Generation, job: _Job) -> Any:
        if job.needs_ctx and gen.ectx is None:
            raise DeviceError(f"TPM is not open (while trying to {job.what})")
        from tpm2_pytss import TSS2_Exception

        try:
            return job.fn(gen.ectx)
        except TSS2_Exception as exc:
            self.errors += 1
            raise TpmError.from_tss(exc, job.what, tcti=self.tcti) from exc

    # -- loop-side callbacks (all on the event loop thread)

    def _on_start(self, gen: _Generation, job: _Job) -> None:
        if job.fut.done():
            return
        if gen.abandoned:
            # The thread took this job before the loop abandoned its generation (the job
            # before it broke the transport): no watchdog will ever bound it, and the
            # context it runs on is being given up. Fail it as a queued call, now.
            self._refuse_abandoned(job)
            return
        job.timer = job.loop.call_later(job.timeout_s, self._on_timeout, gen, job)

    def _refuse_abandoned(self, job: _Job) -> None:
        if not job.fut.done():
            job.fut.set_exception(self._abandoned_error(job.what, self._broken or "abandoned"))

    def _abandoned_error(self, what: str, reason: str) -> DeviceError:
        return DeviceError(
            f"TPM at {self.tcti} stopped answering ({reason}); cannot {what} now, retry "
            "(the context is being re-opened)"
        )

    def _on_done(self, gen: _Generation, job: _Job, result: Any, exc: BaseException | None) -> None:
        if job.timer is not None:
            job.timer.cancel()
        if job.fut.done():
            return
        if exc is not None:
            job.fut.set_exception(exc)
            if isinstance(exc, TpmError) and exc.rc & LAYER_MASK == TCTI_LAYER and self._opened:
                # the connection itself broke (TPM restarted, device reset): a new
                # context is the only way back, as after a timeout
                self._abandon(gen, f"transport error while trying to {job.what}")
        else:
            job.fut.set_result(result)

    def _on_timeout(self, gen: _Generation, job: _Job) -> None:
        if job.fut.done():
            return
        self.timeouts += 1
        msg = (
            f"TPM at {self.tcti} did not answer within {job.timeout_s:.1f} s while trying to "
            f"{job.what} (identity.call_timeout_ms); the TPM may be hung or very slow. The "
            "context is abandoned and re-opened on the next call"
        )
        job.fut.set_exception(DeviceError(msg))
        self._abandon(gen, f"timed out while trying to {job.what}")

    def _abandon(self, gen: _Generation, reason: str) -> None:
        if gen.abandoned:
            return
        gen.abandoned = True
        log.error("tpm_context_abandoned", tcti=self.tcti, reason=reason, generation=gen.number)
        self._abandoned = [g for g in self._abandoned if _alive(g)] + [gen]
        # wake the thread if idle (it exits and closes its context), fail what was queued
        while True:
            try:
                queued = gen.jobs.get_nowait()
            except queue.Empty:
                break
            if queued is not None and not queued.fut.done():
                queued.fut.set_exception(self._abandoned_error(queued.what, reason))
        gen.jobs.put(None)
        if gen is self._gen:
            self._broken = reason
            self._next_reopen = 0.0
            self._gen = self._new_generation()

    # -- submission

    def _submit(
        self, gen: _Generation, fn: Callable[[Any], T], what: str, needs_ctx: bool, timeout_s: float
    ) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._pending += 1
        fut.add_done_callback(self._one_less)
        self._ensure_thread(gen)
        gen.jobs.put(_Job(fn, what, needs_ctx, timeout_s, loop, fut))
        return fut

    def _one_less(self, _fut: asyncio.Future[Any]) -> None:
        self._pending -= 1

    # -- lifecycle

    async def open(self) -> None:
        await self._await(
            self._submit(self._gen, self._open_on(self._gen), "open the TPM", False,
                         self.call_timeout_ms / 1000)
        )  # fmt: skip
        self._opened = True

    def _open_on(self, gen: _Generation) -> Callable[[Any], None]:
        def job(_: Any) -> None:
            gen.ectx, gen.tcti = _open_context(self.tcti, self.call_timeout_ms)

        return job

    async def _reopen(self) -> None:
        if self._reopen_lock is None:
            self._reopen_lock = asyncio.Lock()
        async with self._reopen_lock:
            if self._broken is None:
                return  # another caller reopened meanwhile
            now = time.monotonic()
            if now < self._next_reopen:
                raise DeviceError(
                    f"TPM at {self.tcti} is not answering ({self._broken}); re-opening the "
                    f"context failed, next attempt in {self._next_reopen - now:.1f} s"
                )
            hung = [g for g in self._abandoned if _alive(g)]
            if len(hung) >= MAX_ABANDONED_THREADS:
                self._next_reopen = now + self.reopen_backoff_s
                raise DeviceError(
                    f"TPM at {self.tcti} is not answering: {len(hung)} TPM calls are still "
                    "stuck inside libtss2; check the TPM/kernel log (dmesg | grep -i tpm)"
                )
            gen = self._gen
            open_job = self._open_on(gen)
            hook = self.on_reopen

            def job(ectx: Any) -> None:
                open_job(ectx)
                if hook is not None:
                    hook(gen.ectx)

            try:
                await self._await(
                    self._submit(gen, job, "re-open the TPM context", False,
                                 self.call_timeout_ms / 1000)
                )  # fmt: skip
            except DeviceError as exc:
                if not gen.abandoned:  # it answered but refused: start over next time
                    self._abandon(gen, f"re-open failed: {exc}")
                    self._broken = f"re-open failed: {exc}"
                self._next_reopen = time.monotonic() + self.reopen_backoff_s
                raise
            self._broken = None
            self.reopens += 1
            log.warning("tpm_context_reopened", tcti=self.tcti, generation=gen.number)

    async def close(self) -> None:
        """Finalize the context on its worker thread, then stop the thread."""
        gen = self._gen
        if gen.thread is None:
            return
        if gen.running is None and self._broken is None:
            try:
                await self._await(
                    self._submit(gen, lambda _e: _close_context(gen), "close the TPM", False,
                                 self.call_timeout_ms / 1000)
                )  # fmt: skip
            except DeviceError:
                pass
        if not gen.abandoned:
            gen.jobs.put(None)
            await asyncio.to_thread(gen.thread.join, 5.0)
        self._gen = self._new_generation()
        self._opened = False

    # -- calls

    async def call(
        self,
        fn: Callable[[Any], T],
        *,
        what: str,
        timeout_ms: int | None = None,
        needs_ctx: bool = True,
    ) -> T:
        """Run `fn(ectx)` on the TPM thread; `what` names the operation in error messages."""
        if self._broken is not None:
            await self._reopen()
        if self._pending >= self.max_queued:
            self.busy_refusals += 1
            raise TpmBusy(
                f"TPM busy: {self._pending} calls already queued (limit {self.max_queued}); "
                f"cannot {what} now, retry later"
            )
        self.calls += 1
        timeout_s = (timeout_ms if timeout_ms is not None else self.call_timeout_ms) / 1000
        return await self._await(self._submit(self._gen, fn, what, needs_ctx, timeout_s))

    @staticmethod
    async def _await(fut: asyncio.Future[T]) -> T:
        # shield: a cancelled caller abandons the result, never the job; the worker's
        # watchdog (not the caller) bounds the execution time
        return await asyncio.shield(fut)


def _alive(gen: _Generation) -> bool:
    return gen.thread is not None and gen.thread.is_alive()


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    if not loop.is_closed():
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed between the check and the call
            pass


def _open_context(tcti_conf: str, timeout_ms: int) -> tuple[Any, Any]:
    from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception

    name, _sep, conf = tcti_conf.partition(":")
    try:
        tcti = TCTILdr(name, conf or None)
    except TSS2_Exception as exc:
        raise TpmError.from_tss(exc, f"open TCTI {tcti_conf!r}", tcti=tcti_conf) from exc
    try:
        ectx = ESAPI(tcti)
    except TSS2_Exception as exc:
        tcti.close()
        raise TpmError.from_tss(exc, "initialise ESAPI", tcti=tcti_conf) from exc
    from tpm2_pytss._libtpm2_pytss import lib

    # libtss2 receive timeout per poll of the TCTI
    lib.Esys_SetTimeout(ectx._ctx, timeout_ms)
    return ectx, tcti


def _close_context(gen: _Generation) -> None:
    ectx, gen.ectx = gen.ectx, None
    tcti, gen.tcti = gen.tcti, None
    if ectx is not None:
        try:
            ectx.close()
        finally:
            if tcti is not None:
                tcti.close()
