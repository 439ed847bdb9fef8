"""Base struct for every config section: unknown keys are errors, fields are keyword-only."""

from __future__ import annotations

import msgspec


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every config section subclasses this. Units live in key names (`period_ms`)."""
