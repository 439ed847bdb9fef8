"""What a technician sees of a quarantined slot or of updates refused whatever the bundle:
`edgerund check` (toolkit.check) and the `edgerunctl models` table (pure views of status)."""

from __future__ import annotations

from edgerund.ctl.render import model_row
from edgerund.toolkit.check import check_models, check_updates

QUARANTINED = {
    "name": "motor-ae",
    "version": "2.0.0",
    "state": "ROLLED_BACK",
    "quarantined": {"b": {"reason": "slot_model_manifest", "message": "slot b: ...", "at": 1.0}},
}


def test_check_models_warns_about_a_quarantined_slot() -> None:
    r = check_models({"models": [QUARANTINED]})
    assert r.level == "WARN"
    assert "slot b quarantined" in r.message and "slot_model_manifest" in r.message
    assert check_models({"models": [{"name": "m", "version": "1", "state": "IDLE"}]}).level == "OK"


def test_check_updates_fails_when_every_bundle_is_refused() -> None:
    st = {
        "updates": {
            "refused": {"reason": "keyring_below_floor", "message": "deliver keyrings v2..v2"},
            "keyring": {"version": 1},
        }
    }
    r = check_updates(st)
    assert r.level == "FAIL" and "keyring_below_floor" in r.message
    ok = check_updates({"updates": {"refused": None, "keyring": {"version": 2}}})
    assert ok.level == "OK" and "v2" in ok.message


def test_models_table_shows_the_quarantine() -> None:
    assert model_row(QUARANTINED)["last error"] == "slot b quarantined: slot_model_manifest"
