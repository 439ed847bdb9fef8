"""Desired state: the decisions (pure: documents, the file's config and the policy in;
a verdict and the merged config data out). The I/O and the probation are in applier.py.

View. The config file has lists of objects keyed by `id` (`sensors`, `loops`) or `name`
(`models`); a JSON merge patch (RFC 7386) replaces lists whole, so the twin addresses them
as objects keyed by that id: `{"loops": {"motor": {"policy": {"threshold": 0.4}}}}`.
`to_view` and `from_view` convert (order kept; an id the file does not have is refused:
the twin changes settings, it does not add loops or sensors).

Policy. A patch's leaf paths (dotted, in the view) must each match a pattern of the file's
`twin.allow`, segment by segment (`*` is one segment; a pattern matching a path's prefix
allows what is under it, so `loops.*.policy` allows `loops.motor.policy.threshold`), and
must not start with a forbidden root (`FORBIDDEN`), whatever `allow` says.

Verdicts. A desired document is refused, with a stable reason, when it is not signed by
an operator key (auth.open_envelope), is for another gateway, has a version not above the
last one applied or refused (`replay`), has expired, or patches a forbidden or unlisted
key (`forbidden_key`, naming the path).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgerund.errors import TrustError
from edgerund.twin.auth import DESIRED_DOMAIN, DESIRED_TYPE, open_envelope

FORBIDDEN = ("identity", "updates", "paths", "diag", "twin", "gateway", "simulation")
KEYED_LISTS = {"sensors": "id", "loops": "id", "models": "name"}
MAX_PATCH_LEAVES = 256


@dataclass(frozen=True, slots=True)
class Desired:
    version: int
    config: dict[str, Any]  # the merge patch, in the view
    models: dict[str, Any]
    expires_ms: int
    keyid: str
    raw: bytes  # the envelope as received (persisted, re-verified at start-up)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def to_view(data: Mapping[str, Any]) -> dict[str, Any]:
    view = copy.deepcopy(dict(data))
    for section, key in KEYED_LISTS.items():
        items = view.get(section)
        if isinstance(items, list):
            view[section] = {
                str(it.get(key)): it for it in items if isinstance(it, dict) and key in it
            }
    return view


def from_view(view: Mapping[str, Any], original: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(view)
    for section, key in KEYED_LISTS.items():
        items = view.get(section)
        orig = original.get(section)
        if isinstance(items, dict) and isinstance(orig, list):
            order = [str(it.get(key)) for it in orig if isinstance(it, dict)]
            extra = sorted(set(items) - set(order))
            if extra:
                raise TrustError(
                    "forbidden_key",
                    f"{section}.{extra[0]}: the twin changes settings, it does not add {section}",
                )
            data[section] = [items[i] for i in order if i in items]
    return data


def leaves(patch: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for k, v in patch.items():
        path = (*prefix, str(k))
        if isinstance(v, dict) and v:
            out.extend(leaves(v, path))
        else:
            out.append(path)
    return out


def _matches(pattern: Sequence[str], path: Sequence[str]) -> bool:
    if len(pattern) > len(path):
        return False
    return all(p == "*" or p == s for p, s in zip(pattern, path, strict=False))


def check_allowed(patch: Mapping[str, Any], allow: Sequence[str]) -> None:
    """TrustError("forbidden_key") naming the first path the policy does not allow."""
    paths = leaves(patch)
    if len(paths) > MAX_PATCH_LEAVES:
        raise TrustError(
            "forbidden_key", f"patch: expected <= {MAX_PATCH_LEAVES} keys, got {len(paths)}"
        )
    patterns = [p.split(".") for p in allow]
    for path in paths:
        dotted = ".".join(path)
        if path[0] in FORBIDDEN:
            raise TrustError("forbidden_key", f"{dotted}: `{path[0]}` can never be set remotely")
        if not any(_matches(p, path) for p in patterns):
            raise TrustError("forbidden_key", f"{dotted}: not allowed by the file's twin.allow")


def open_desired(
    data: bytes,
    *,
    gateway: str,
    operators: Mapping[str, Ed25519PublicKey],
    publishers: Mapping[str, Ed25519PublicKey] | None,
    last_version: int,
    now_ms: int | None,
) -> Desired:
    """Verify a desired document. `now_ms` None skips the expiry check (start-up re-check
    of a document applied before: it was valid when applied)."""
    op = open_envelope(
        data,
        domain=DESIRED_DOMAIN,
        doc_type=DESIRED_TYPE,
        gateway=gateway,
        operators=operators,
        publishers=publishers,
    )
    s = op.signed
    version, expires = s.get("version"), s.get("expires")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TrustError("malformed", f"signed.version: expected an integer >= 1, got {version!r}")
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise TrustError("malformed", f"signed.expires: expected integer ms, got {expires!r}")
    cfg, models = s.get("config", {}), s.get("models", {})
    if not isinstance(cfg, dict) or not isinstance(models, dict):
        raise TrustError("malformed", "signed.config and signed.models: expected objects")
    if version <= last_version:
        raise TrustError(
            "replay", f"signed.version: expected > {last_version} (last seen), got {version}"
        )
    if now_ms is not None and expires <= now_ms:
        raise TrustError(
            "expired", f"desired v{version} expired {(now_ms - expires) / 1000:.0f} s ago"
        )
    return Desired(version, cfg, models, expires, op.keyid, data)


def merged_data(file_data: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """The file's config data with the patch applied (raw YAML data, env not expanded)."""
    return from_view(merge_patch(to_view(file_data), patch), file_data)


def origins(patch: Mapping[str, Any], version: int) -> dict[str, str]:
    """Dotted view path -> "twin vN" for every key the patch sets (the rest: "file")."""
    return {".".join(p): f"twin v{version}" for p in leaves(patch)}
