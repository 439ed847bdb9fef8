"""Schema of the `identity` section (owned by the identity component)."""

from __future__ import annotations

from typing import Literal

from edgerund.config.base import Section


class IdentityConfig(Section):
    kind: Literal["tpm", "software"] = "software"
