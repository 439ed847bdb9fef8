"""What a verifier pins at enrolment, taken from a result the test trusts (its own TPM)."""

from __future__ import annotations

from typing import Any


def nv_name_of(result: dict[str, Any]) -> bytes | None:
    nvb = result.get("nv_binding")
    return bytes.fromhex(nvb["name"]) if isinstance(nvb, dict) else None


def pins(result: dict[str, Any]) -> dict[str, Any]:
    """`verify_result` keywords pinning the AK and the NV binding index of `result`."""
    return {"ak_pem": result["ak_pem"], "nv_name": nv_name_of(result)}
