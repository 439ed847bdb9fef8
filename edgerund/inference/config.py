"""Schema of the `models` section (owned by the inference component)."""

from __future__ import annotations

from edgerund.config.base import Section


class ModelConfig(Section):
    name: str
    path: str
