"""A stand-in for the daemon in kill -9 tests: opens the TPM identity, then uses its keys in
a loop (sign, quote + certify, counter) until killed. Prints READY after the first round.

usage: python -m tests.identity.keyuser TCTI STATE_DIR
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TSS2_LOG", "all+NONE")

from edgerund.identity.config import IdentityConfig
from edgerund.identity.tpm import TpmIdentity


async def main(tcti: str, state: Path) -> None:
    ident = TpmIdentity(IdentityConfig(kind="tpm", tcti=tcti), state)
    await ident.open()
    await ident.bind_config(hashlib.sha256(b"keyuser").digest())
    n = 0
    while True:
        await ident.sign_digest(hashlib.sha256(n.to_bytes(8, "big")).digest())
        await ident.attest(n.to_bytes(8, "big"))
        if n % 10 == 0:
            await ident.counter_increment()
        if n == 0:
            print("READY", flush=True)
        n += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
