"""Identity benchmark: TPM latencies on swtpm, and event-loop lag during a quote burst.

    python benchmarks/identity.py [--quotes 200] [--signs 500] [--increments 100]

Starts a private swtpm (provisioned like the tests), enrols, then measures p50/p99 of
  - attest (TPM2_Quote over 9 PCRs + 2x PCR_Read + TPM2_Certify + result assembly),
  - sign_digest (TPM2_Sign, ECDSA P-256),
  - counter_increment (TPM2_NV_Increment + NV_Read),
against a baseline measured in the same run: the software identity doing the same work
in-process (so the ratio is the cost of the TPM round trips). Then a 100 Hz ticker runs while
100 quotes are issued through the identity's worker thread, and again while the same 100
quotes run inline on the loop (the design we avoid): missed ticks = ticks later than one
period. swtpm is 1-2 orders of magnitude faster than a real TPM chip (docs/identity.md).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TSS2_LOG", "all+NONE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgerund.identity.config import IdentityConfig
from edgerund.identity.software import SoftwareIdentity
from edgerund.identity.tpm import TpmIdentity
from tests.fixtures.swtpm import SwtpmProcess, provision_state


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def timed(n: int, fn: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        await fn(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


async def ticker_during(
    work: Callable[[], Awaitable[None]], period: float = 0.01
) -> dict[str, float]:
    lateness: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        deadline = time.monotonic()
        while not done.is_set():
            deadline += period
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            lateness.append(time.monotonic() - deadline)

    task = asyncio.create_task(tick())
    await asyncio.sleep(3 * period)
    t0 = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - t0
    done.set()
    await task
    return {
        "missed": sum(1 for x in lateness if x > period),
        "max_ms": max(lateness) * 1000 if lateness else 0.0,
        "p99_ms": pct(lateness, 0.99) * 1000 if lateness else 0.0,
        "elapsed_s": elapsed,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="edgerund-bench-identity-"))
    try:
        provision_state(base / "tpm", base / "setup")
        swtpm = SwtpmProcess(shutil.which("swtpm") or "/usr/bin/swtpm", base / "tpm",
                             base / "swtpm.log")  # fmt: skip
        swtpm.start()
        try:
            return await run(args, base, swtpm)
        finally:
            swtpm.kill()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def run(args: argparse.Namespace, base: Path, swtpm: SwtpmProcess) -> dict[str, Any]:
    t0 = time.perf_counter()
    tpm = TpmIdentity(IdentityConfig(kind="tpm", tcti=swtpm.tcti), base / "state")
    await tpm.open()
    enrol_ms = (time.perf_counter() - t0) * 1000
    sw = SoftwareIdentity(IdentityConfig(), base / "sw")
    await sw.open()
    digest = hashlib.sha256(b"batch").digest()
    res: dict[str, Any] = {"enrol_ms": round(enrol_ms, 1)}
    try:
        await tpm.bind_config(hashlib.sha256(b"config").digest())
        await sw.bind_config(hashlib.sha256(b"config").digest())
        q = await timed(args.quotes, lambda i: tpm.attest(i.to_bytes(8, "big")))
        qb = await timed(args.quotes, lambda i: sw.attest(i.to_bytes(8, "big")))
        s = await timed(args.signs, lambda i: tpm.sign_digest(digest))
        sb = await timed(args.signs, lambda i: sw.sign_digest(digest))
        c = await timed(args.increments, lambda i: tpm.counter_increment())
        cb = await timed(args.increments, lambda i: sw.counter_increment())
        for name, xs, bl in (("quote", q, qb), ("sign", s, sb), ("counter_increment", c, cb)):
            res[f"{name}_p50_ms"] = round(pct(xs, 0.5), 3)
            res[f"{name}_p99_ms"] = round(pct(xs, 0.99), 3)
            res[f"{name}_software_p50_ms"] = round(pct(bl, 0.5), 3)
            res[f"{name}_vs_software_ratio"] = round(pct(xs, 0.5) / max(pct(bl, 0.5), 1e-6), 1)

        async def burst() -> None:
            await asyncio.gather(*(tpm.attest(i.to_bytes(4, "big")) for i in range(100)))

        idle = await ticker_during(lambda: asyncio.sleep(1.0))
        lag = await ticker_during(burst)

        async def inline_burst() -> None:  # what the worker thread avoids
            for i in range(100):
                tpm._quote_job(tpm.worker.current_context, i.to_bytes(4, "big"))
                await asyncio.sleep(0)  # the loop runs between quotes, as with awaited calls

        # the worker thread must be idle for the inline run (same ESAPI context)
        inline = await ticker_during(inline_burst)
        res.update(
            {
                "missed_ticks_during_quotes": lag["missed"],
                "max_tick_lateness_during_quotes_ms": round(lag["max_ms"], 2),
                "p99_tick_lateness_during_quotes_ms": round(lag["p99_ms"], 2),
                "quote_burst_100_s": round(lag["elapsed_s"], 3),
                "max_tick_lateness_idle_ms": round(idle["max_ms"], 2),
                "missed_ticks_idle": idle["missed"],
                "missed_ticks_inline_quotes_baseline": inline["missed"],
                "max_tick_lateness_inline_quotes_ms": round(inline["max_ms"], 2),
            }
        )
    finally:
        await tpm.close()
        await sw.close()
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quotes", type=int, default=200)
    ap.add_argument("--signs", type=int, default=500)
    ap.add_argument("--increments", type=int, default=100)
    a = ap.parse_args()
    r = asyncio.run(main(a))
    print("identity on swtpm (ms; ratio = TPM p50 / software-identity p50 in this run)")
    for op in ("quote", "sign", "counter_increment"):
        print(f"  {op:18s} p50 {r[op + '_p50_ms']:8.3f}  p99 {r[op + '_p99_ms']:8.3f}  "
              f"software p50 {r[op + '_software_p50_ms']:7.3f}  ratio x{r[op + '_vs_software_ratio']}")  # fmt: skip
    print(
        f"  100 Hz ticker, 100 quotes via worker: missed {r['missed_ticks_during_quotes']}, "
        f"max lateness {r['max_tick_lateness_during_quotes_ms']} ms "
        f"(idle max {r['max_tick_lateness_idle_ms']} ms)"
    )
    print(
        f"  same burst inline on the loop (baseline): missed "
        f"{r['missed_ticks_inline_quotes_baseline']}, max lateness "
        f"{r['max_tick_lateness_inline_quotes_ms']} ms"
    )
    print(json.dumps(r))
