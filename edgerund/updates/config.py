"""Schema of the `updates` section (owned by the updates component)."""

from __future__ import annotations

from edgerund.config.base import Section


class UpdatesConfig(Section):
    enabled: bool = False
