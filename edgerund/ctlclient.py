"""Former home of the diagnostics socket client: it lives in `edgerund.ctl.client`.

Kept only so that scripts written against the old import path keep working; new code
imports `edgerund.ctl.client`.
"""

from edgerund.ctl.client import (
    DEFAULT_SOCKET,
    SIMULATE_SOCKET,
    DiagClient,
    RemoteCommandError,
    Unreachable,
    default_socket,
)

__all__ = [
    "DEFAULT_SOCKET",
    "SIMULATE_SOCKET",
    "DiagClient",
    "RemoteCommandError",
    "Unreachable",
    "default_socket",
]
