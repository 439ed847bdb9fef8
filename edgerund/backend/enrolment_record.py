"""The enrolment record: what a verifier pins at registration, as one JSON file.

`edgerund attest enroll` proves the AK by credential activation (enroll.py) and writes the
AK PEM (`--out`, unchanged, also usable with tpm2_checkquote) and this record next to it
(`--record`, default `<out stem>.enrolment.json`):

    {"version": 1, "ak_name": hex, "ak_pem": PEM,
     "nv_binding": {"index": "0x01500101", "name": hex} | null}

`nv_binding.name` is the Name of the NV binding index (docs/identity.md "The NV binding").
It is taken at registration from an NV certification made by the just-proven AK over the
verifier's fresh nonce, read from the daemon itself: the Name then commits to the index
handle, its attributes (POLICYWRITE only: only the daemon writes) and its policy. Every
later `edgerund attest verify --enrolment FILE` requires the certified Name to equal it,
so a certification of an index a local attacker defined elsewhere (the AK has an empty
authValue and certifies whatever it is asked to) is refused. `null`: enrolled without a
result carrying an NV binding (an old gateway, or the offline flow without `--result`);
verify then needs `--nv-name HEX` or `--insecure-skip-nv-binding`.

Pure data: reading and writing the file is the CLI's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RECORD_VERSION = 1


class RecordError(ValueError):
    pass


@dataclass(frozen=True)
class EnrolmentRecord:
    ak_name: bytes
    ak_pem: str
    nv_index: str | None = None
    nv_name: bytes | None = None

    def as_dict(self) -> dict[str, Any]:
        nv = None if self.nv_name is None else {"index": self.nv_index, "name": self.nv_name.hex()}
        return {
            "version": RECORD_VERSION,
            "ak_name": self.ak_name.hex(),
            "ak_pem": self.ak_pem,
            "nv_binding": nv,
        }

    @classmethod
    def from_dict(cls, d: Any) -> EnrolmentRecord:
        if not isinstance(d, Mapping) or d.get("version") != RECORD_VERSION:
            raise RecordError(f"not an enrolment record (version {RECORD_VERSION} expected)")
        try:
            ak_name = bytes.fromhex(str(d["ak_name"]))
            ak_pem = d["ak_pem"]
            if not isinstance(ak_pem, str) or "BEGIN PUBLIC KEY" not in ak_pem:
                raise RecordError("ak_pem must be a PEM public key")
            nv = d.get("nv_binding")
            if nv is None:
                return cls(ak_name, ak_pem)
            if not isinstance(nv, Mapping):
                raise RecordError("nv_binding must be an object or null")
            name = bytes.fromhex(str(nv["name"]))
        except (KeyError, ValueError) as exc:
            raise RecordError(f"malformed enrolment record: {exc}") from None
        if len(name) != 34:  # nameAlg (sha256) || digest
            raise RecordError(f"nv_binding.name has {len(name)} bytes, expected 34")
        return cls(ak_name, ak_pem, str(nv.get("index")), name)


def record_path_for(ak_out: str) -> str:
    """The default record path next to the AK PEM: gw1-ak.pem -> gw1-ak.enrolment.json."""
    base = ak_out[: -len(".pem")] if ak_out.endswith(".pem") else ak_out
    return base + ".enrolment.json"
