"""identity config: defaults and cross-field checks."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from edgerund.identity.config import IdentityConfig, cross_check
from tests.identity.conftest import make_config


def test_defaults():
    c = IdentityConfig()
    assert (c.tcti, c.fallback, c.pcr_binding) == ("device:/dev/tpmrm0", "none", 23)
    assert c.pcr_selection == "sha256:0,1,2,3,4,5,6,7,23"


def test_unknown_key_and_bad_kind_rejected():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"kind": "hsm"}, IdentityConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"tcit": "x"}, IdentityConfig)


@pytest.mark.parametrize(
    ("identity", "path", "text"),
    [
        ({"pcr_binding": 10}, "identity.pcr_binding", "expected one of [16, 23]"),
        ({"pcr_selection": "sha256:0,1"}, "identity.pcr_selection", "binding PCR 23"),
        ({"pcr_selection": "md5:1"}, "identity.pcr_selection", "bad PCR bank"),
        ({"kind": "tpm", "tcti": ":x"}, "identity.tcti", "NAME[:CONF]"),
        ({"ak_handle": 0x81000001}, "identity.ak_handle", "three different handles"),
        ({"nv_counter_index": 0x81000001}, "identity.nv_counter_index", "0x01000000"),
        ({"call_timeout_ms": 0}, "identity.call_timeout_ms", "expected > 0"),
    ],
)
def test_cross_check(tmp_path: Path, identity: dict[str, object], path: str, text: str):
    errors = cross_check(make_config(tmp_path, **identity))
    assert any(p == path and text in m for p, m in errors), errors


def test_cross_check_clean(tmp_path: Path):
    assert cross_check(make_config(tmp_path, kind="tpm", pcr_binding=16,
                                   pcr_selection="sha256:0,16")) == []  # fmt: skip
