"""PEM files of a TLS client (the uplink, the twin's `url` downloads): checked and loaded
without ever reaching OpenSSL's passphrase prompt.

Why a module of its own: `ssl.SSLContext.load_cert_chain` without a password asks for
an encrypted key's passphrase on the controlling terminal. Under systemd that fails, but
a technician who runs `edgerund run` or `edgerunctl check` in a shell would see the
process stop and wait at "Enter PEM pass phrase:" (the daemon's event loop with it).
Here the password callback returns nothing, so an encrypted key fails to load, and the
error names the file and says what was expected. `ssl` is imported only when a context
is built. Blocking (reads files): callers run it in a thread.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl


class TlsFileError(ValueError):
    """A file that does not load; `role` is "ca" (the CA bundle) or "cert" (the client
    certificate and its key)."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(message)
        self.role = role


def file_problem(path: str, *, absolute: bool = True) -> str | None:
    """Why `path` cannot serve as a PEM file, or None."""
    if absolute and not os.path.isabs(path):
        return f"expected an absolute path, got {path!r}"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        return f"expected a PEM file, got {path!r}: no such file"
    except IsADirectoryError:
        return f"expected a PEM file, got {path!r}: a directory"
    except PermissionError:
        return (
            f"expected a PEM file the daemon can read, got {path!r}: permission denied"
            " (run as root or a member of the edgerund group)"
        )
    except OSError as exc:
        return f"expected a PEM file, got {path!r}: {exc.strerror}"
    return None


def _no_password() -> bytes:
    return b""  # never OpenSSL's terminal prompt: an encrypted key fails to load instead


def client_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context verifying the server against `ca_file` (only those CAs: a private
    PKI) or, without one, the system store; with `cert_file`, mutual TLS with that
    certificate and its unencrypted key. TlsFileError when a file does not load."""
    import ssl

    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileError(
            "ca", f"expected PEM CA certificates in {ca_file!r}, got: {exc}"
        ) from None
    if cert_file is not None:
        try:
            ctx.load_cert_chain(cert_file, key_file, password=_no_password)
        except (ssl.SSLError, OSError) as exc:
            raise TlsFileError(
                "cert",
                f"expected a PEM certificate in {cert_file!r} and its unencrypted private"
                f" key in {key_file!r}, got: {exc}",
            ) from None
    return ctx
