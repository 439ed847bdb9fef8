"""One thread owning one ESAPI context: every TPM command runs there.

Why a single thread: an ESYS context is not thread-safe (tpm2-tss #2926) and a TPM executes
one command at a time anyway, so a one-thread executor serializes commands without locks
and keeps the event loop free (tpm2-pytss releases the GIL inside libtss2 calls; measured
worst loop stall 1.8 ms through the executor vs 60-160 ms inline during RSA key creation).

Jobs are plain functions `fn(ectx) -> T`. A job that creates transient objects or sessions
must flush them in `finally` (a TPM without a resource manager has ~3 object slots), so a
cancelled caller never leaks a slot: cancellation only abandons the *result*, the job
itself always runs to completion on the worker thread.

Timeouts are enforced twice: libtss2's own receive timeout (Esys_SetTimeout, so a silent
TPM fails the command inside the TSS) and an asyncio timeout around the job. If the asyncio
timeout fires the worker thread may be stuck in the TCTI; the worker is then marked wedged
and every later call fails fast with a DeviceError instead of queueing behind it.

TSS errors are translated into DeviceErrors whose messages say what to do (tpm_errors.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from edgerund.errors import DeviceError
from edgerund.identity.tpm_errors import TpmError, describe

os.environ.setdefault("TSS2_LOG", "all+NONE")  # libtss2 logs ERRORs for expected failures

T = TypeVar("T")


class TpmWorker:
    def __init__(self, tcti: str, call_timeout_ms: int) -> None:
        self.tcti = tcti
        self.call_timeout_ms = call_timeout_ms
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpm")
        self._ectx: Any = None
        self._thread_id: int | None = None
        self._wedged = False
        self.calls = 0
        self.errors = 0

    @property
    def thread_id(self) -> int | None:
        return self._thread_id

    # -- lifecycle

    async def open(self) -> None:
        await self.call(self._open, what="open the TPM", timeout_ms=self.call_timeout_ms,
                        needs_ctx=False)  # fmt: skip

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

        # libtss2 receive timeout, so a TPM that stops answering fails inside the TSS
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
        self._executor.shutdown(wait=not self._wedged, cancel_futures=True)

    def _close(self, _: Any) -> None:
        ectx, self._ectx = self._ectx, None
        if ectx is not None:
            ectx.close()
            self._tcti_obj.close()

    # -- calls

    def _run(self, fn: Callable[[Any], T], what: str, needs_ctx: bool) -> T:
        self._thread_id = threading.get_ident()
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
        self.calls += 1
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, self._run, fn, what, needs_ctx)
        timeout_s = (timeout_ms if timeout_ms is not None else self.call_timeout_ms) / 1000
        try:
            # shield: a timed-out/cancelled caller abandons the result, never the job
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s + 1.0)
        except TimeoutError:
            self._wedged = True
            raise DeviceError(
                f"TPM at {self.tcti} did not answer within {timeout_s:.1f} s while trying to "
                f"{what} (identity.call_timeout_ms); the TPM may be hung or very slow"
            ) from None

    def call_sync(self, fn: Callable[[Any], T], *, what: str) -> T:
        """Blocking variant for CLI tools and shutdown paths that have no running loop."""
        return self._executor.submit(self._run, fn, what, True).result(
            timeout=self.call_timeout_ms / 1000 + 1.0
        )


def describe_error(exc: BaseException, what: str, tcti: str) -> str:
    """Human text for any exception from a TPM job (exposed for the CLI)."""
    return describe(exc, what, tcti)
