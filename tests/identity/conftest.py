"""Helpers for identity tests: configs, contexts, tpm2-tools lookups."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edgerund.config.schema import Config
from edgerund.context import Context, Supervisor
from edgerund.identity.config import IdentityConfig
from tests.fixtures.binaries import require_binary
from tests.telemetry.conftest import collector_factory  # noqa: F401  (fixture, re-exported)

os.environ.setdefault("TSS2_LOG", "all+NONE")


def make_config(state_dir: Path, **identity: Any) -> Config:
    return msgspec.convert(
        {
            "gateway": {"id": "gw-test"},
            "paths": {"state_dir": str(state_dir), "run_dir": str(state_dir / "run")},
            "identity": identity,
        },
        Config,
    )


def make_context(state_dir: Path, config_path: Path | None = None, **identity: Any) -> Context:
    cfg = make_config(state_dir, **identity)
    if config_path is None:
        config_path = state_dir / "edgerund.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text("gateway:\n  id: gw-test\n")

    def on_fatal(exc: BaseException) -> None:
        raise AssertionError(f"fatal: {exc!r}")

    return Context(config=cfg, config_path=config_path, supervisor=Supervisor(on_fatal))


def tpm_config(tcti: str, **kw: Any) -> IdentityConfig:
    return msgspec.convert({"kind": "tpm", "tcti": tcti, **kw}, IdentityConfig)


@pytest.fixture
def tpm2_checkquote() -> str:
    return require_binary("tpm2_checkquote", "apt-get install tpm2-tools")
