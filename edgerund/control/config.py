"""Schema of the `loops` section (owned by the control component)."""

from __future__ import annotations

from edgerund.config.base import Section


class LoopConfig(Section):
    id: str
    period_ms: int = 10
