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

Timeouts: every call is bounded by an asyncio timeout (`call_timeout_ms`). libtss2's
synchronous ESYS calls retry internally on TRY_AGAIN, so a TPM that stops answering can keep
the worker thread inside libtss2 forever; when a call times out the worker is marked wedged
and every later call fails fast with a DeviceError instead of queueing behind it. The thread
is a daemon thread (not a ThreadPoolExecutor, whose threads are joined at interpreter exit),
so a wedged TPM can never keep the daemon from exiting.

TSS errors are translated into DeviceErrors whose messages say what to do (tpm_errors.py).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from edgerund.errors import DeviceError
from edgerund.identity.tpm_errors import TpmError

os.environ.setdefault("TSS2_LOG", "all+NONE")  # libtss2 logs ERRORs for expected failures

T = TypeVar("T")
_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class TpmWorker:
    def __init__(self, tcti: str, call_timeout_ms: int) -> None:
        self.tcti = tcti
        self.call_timeout_ms = call_timeout_ms
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ectx: Any = None
        self._tcti_obj: Any = None
        self._wedged = False
        self.calls = 0
        self.errors = 0

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident if self._thread is not None else None

    @property
    def wedged(self) -> bool:
        return self._wedged

    # -- the thread

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, loop, fut = job
            try:
                result = fn()
            except BaseException as exc:  # delivered to the awaiting caller
                if not loop.is_closed():
                    loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(_set_result, fut, result)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tpm", daemon=True)
            self._thread.start()

    # -- lifecycle

    async def open(self) -> None:
        await self.call(self._open, what="open the TPM", needs_ctx=False)

    def _open(self, _: Any) -> None:
        from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception

        name, _sep, conf = self.tcti.partition(":")
        try:
            tcti = TCTILdr(name, conf or None)
        except TSS2_Exception as exc:
            raise TpmError.from_tss(exc, f"open TCTI {self.tcti!r}", tcti=self.tcti) from exc
        try:
            ectx = ESAPI(tcti)
        except TSS2_Exception as exc:
            tcti.close()
            raise TpmError.from_tss(exc, "initialise ESAPI", tcti=self.tcti) from exc
        from tpm2_pytss._libtpm2_pytss import lib

        # libtss2 receive timeout per poll of the TCTI
        lib.Esys_SetTimeout(ectx._ctx, self.call_timeout_ms)
        self._ectx = ectx
        self._tcti_obj = tcti

    async def close(self) -> None:
        """Finalize the context on the worker thread, then stop the thread."""
        if not self._wedged and self._ectx is not None:
            try:
                await self.call(self._close, what="close the TPM", needs_ctx=False)
            except DeviceError:
                pass
        if self._thread is not None and not self._wedged:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join, 5.0)
        self._thread = None

    def _close(self, _: Any) -> None:
        ectx, self._ectx = self._ectx, None
        if ectx is not None:
            ectx.close()
            self._tcti_obj.close()

    # -- calls

    def _run(self, fn: Callable[[Any], T], what: str, needs_ctx: bool) -> T:
        if needs_ctx and self._ectx is None:
            raise DeviceError(f"TPM is not open (while trying to {what})")
        from tpm2_pytss import TSS2_Exception

        try:
            return fn(self._ectx)
        except TSS2_Exception as exc:
            self.errors += 1
            raise TpmError.from_tss(exc, what, tcti=self.tcti) from exc

    async def call(
        self,
        fn: Callable[[Any], T],
        *,
        what: str,
        timeout_ms: int | None = None,
        needs_ctx: bool = True,
    ) -> T:
        """Run `fn(ectx)` on the TPM thread; `what` names the operation in error messages."""
        if self._wedged:
            raise DeviceError(
                f"TPM at {self.tcti} stopped answering earlier; cannot {what} "
                "(restart the daemon; check the TPM/kernel log)"
            )
        self._ensure_thread()
        self.calls += 1
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((lambda: self._run(fn, what, needs_ctx), loop, fut))
        timeout_s = (timeout_ms if timeout_ms is not None else self.call_timeout_ms) / 1000
        try:
            # shield: a timed-out/cancelled caller abandons the result, never the job
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            self._wedged = True
            raise DeviceError(
                f"TPM at {self.tcti} did not answer within {timeout_s:.1f} s while trying to "
                f"{what} (identity.call_timeout_ms); the TPM may be hung or very slow"
            ) from None


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
