"""The `twin` config section (docs/twin.md §5). Set only in the local file: `twin` itself
is never settable remotely."""

from __future__ import annotations

import msgspec

from edgerund.config.base import Section


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
