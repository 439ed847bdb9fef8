"""The `twin` config section (docs/twin.md §7). Set only in the local file: `twin` itself
is never settable remotely.

`twin.fetch` is the TLS of a model target's `url` download (docs/twin.md §5.1): a CA
bundle that replaces the system store, and a client certificate and key for servers that
require mutual TLS. `cross_check` reads the files once (check-config, start, reload) so a
mistyped path or a key that is not the certificate's is a config error with its line, not
a download that fails hours later; the daemon builds its `ssl.SSLContext` from them again
in the fetch's worker thread (twin/fetch.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import msgspec

from edgerund.config.base import Section
from edgerund.tlsfiles import TlsFileError, client_context, file_problem

if TYPE_CHECKING:
    import ssl


class TwinFetchConfig(Section):
    # PEM CA certificates trusted for https `url` targets, INSTEAD of the system store
    # (a private PKI); None: the system store.
    ca_file: str | None = None
    client_cert: str | None = None  # PEM client certificate (mutual TLS), with client_key
    client_key: str | None = None  # PEM private key of client_cert (unencrypted)
    # Consecutive failed attempts of a `url` download after which the bundle is looked up
    # on the broker (bundles/v1/{sha256}/meta) and, if it is published there, fetched from
    # it instead, resuming the same partial file; 0: the url only.
    url_failures_before_broker: int = 3


class TwinConfig(Section):
    # Needs `uplink` (the broker) for the reported/desired topics; signed commands work
    # whenever the verified keyring lists an operator key.
    enabled: bool = True
    topic_prefix: str = "twin/v1"
    heartbeat_s: float = 300.0  # reported state re-published at least this often
    check_interval_s: float = 2.0  # how often the reported state is compared for changes
    command_window_s: float = 300.0  # accepted clock skew/age of a signed command
    probation_s: float = 30.0  # a desired config is kept only if healthy this long
    probation_missed_ticks_max: int = 0  # missed loop ticks tolerated during probation
    # Keys the desired state may set (glob per dotted path, `*` matches one segment);
    # identity, keyring, paths, diag and twin are refused whatever this says.
    allow: list[str] = msgspec.field(default_factory=list)
    fetch: TwinFetchConfig = msgspec.field(default_factory=TwinFetchConfig)


class _Twin(Protocol):
    """What `cross_check` reads of the root config (edgerund/config/schema.py)."""

    @property
    def twin(self) -> TwinConfig: ...


def cross_check(cfg: _Twin) -> list[tuple[str, str]]:
    """`twin.fetch`: the files exist and load as what they claim to be."""
    errs: list[tuple[str, str]] = []
    f = cfg.twin.fetch
    if f.url_failures_before_broker < 0:
        errs.append(
            (
                "twin.fetch.url_failures_before_broker",
                f"expected >= 0 (0: never fall back), got {f.url_failures_before_broker}",
            )
        )
    if (f.client_cert is None) != (f.client_key is None):
        have, miss = ("client_cert", "client_key") if f.client_key is None else (
            "client_key", "client_cert",
        )  # fmt: skip
        errs.append((f"twin.fetch.{miss}", f"expected with {have} (mutual TLS needs both)"))
        return errs
    bad = False
    for key in ("ca_file", "client_cert", "client_key"):
        path = getattr(f, key)
        if path is not None and (why := file_problem(path)) is not None:
            errs.append((f"twin.fetch.{key}", why))
            bad = True
    if bad or (f.ca_file is None and f.client_cert is None):
        return errs
    try:
        ssl_context(f)
    except FetchTlsError as exc:
        errs.append((f"twin.fetch.{exc.key}", str(exc)))
    return errs


class FetchTlsError(ValueError):
    """A `twin.fetch` file that does not load; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def ssl_context(f: TwinFetchConfig) -> ssl.SSLContext:
    """The client context of `url` downloads (blocking: reads the files; ssl is imported
    only here, when a url target or the section needs it). FetchTlsError names the file
    that does not load."""
    try:
        return client_context(f.ca_file, f.client_cert, f.client_key)
    except TlsFileError as exc:
        raise FetchTlsError("ca_file" if exc.role == "ca" else "client_key", str(exc)) from None
