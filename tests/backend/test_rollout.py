"""The rollout decisions, pure: the operator's inputs (rolloutspec.py: selector, waves,
halt rule) and the state machine (rollout.py) driven by simulated gateway reports and a
fake clock."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgerund.backend import rollout as R
from edgerund.backend import rolloutspec as S


def reported(gw: str, site: str = "plant-a", **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "gateway": gw,
        "site": site,
        "daemon_version": "0.1.0",
        "identity": {"kind": "software"},
        "models": [{"name": "motor-ae", "version": "1.0.0", "state": "COMMITTED"}],
        "desired": {},
    }
    doc.update(kw)
    return doc


# --------------------------------------------------------------------------- selector


def test_selector_matches_globs_alternatives_and_negation() -> None:
    sel = S.parse_selector("site=plant-*, hardware_id=pi5|pi4, gateway!=gw-9*")
    f = S.facts_of(reported("gw-1", hardware_id="pi5"))
    assert sel.matches(f)
    assert not sel.matches(S.facts_of(reported("gw-90", hardware_id="pi5")))
    assert not sel.matches(S.facts_of(reported("gw-1", site="lab", hardware_id="pi5")))
    assert not sel.matches(S.facts_of(reported("gw-1")))  # no hardware_id reported: no match
    assert S.parse_selector("").matches(f)
    assert S.parse_selector("model.motor-ae=1.*,identity=software").matches(f)
    hw = S.facts_of(reported("gw-1", hardware={"id": "jetson"}, labels={"line": "3"}))
    assert S.parse_selector("hardware_id=jetson,labels.line=3").matches(hw)


@pytest.mark.parametrize("bad", ["site", "=x", "site=", "a=b,,c=d", "si te=x"])
def test_selector_errors_say_which_term(bad: str) -> None:
    with pytest.raises(S.RolloutError, match="selector term"):
        S.parse_selector(bad)


# --------------------------------------------------------------------------- waves


def test_waves_are_cumulative_and_never_empty() -> None:
    w = S.parse_waves("1,10%,50%,100%")
    assert S.wave_ends(w, 12) == [1, 2, 6, 12]
    assert S.wave_ends(w, 1) == [1]
    assert S.wave_ends(w, 100) == [1, 10, 50, 100]
    assert S.wave_ends(S.parse_waves("5,2,100%"), 10) == [5, 10]
    assert S.wave_ends(S.parse_waves("1,50%"), 10) == [1, 5]  # stops at half, on purpose
    for bad in ["", "0", "101%", "-1", "x", "0%", "1,,2"]:
        with pytest.raises(S.RolloutError):
            S.parse_waves(bad)


@given(
    st.lists(
        st.one_of(
            st.integers(1, 500).map(lambda n: S.WaveSize(count=n)),
            st.floats(0.01, 100).map(lambda p: S.WaveSize(percent=p)),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 300),
)
def test_wave_ends_properties(sizes: list[S.WaveSize], n: int) -> None:
    ends = S.wave_ends([*sizes, S.WaveSize(percent=100)], n)
    assert ends == sorted(set(ends)) and ends[0] >= 1 and ends[-1] == n


# --------------------------------------------------------------------------- halt rule


def m(**kw: float) -> dict[str, float]:
    c = dict.fromkeys(S.METRICS, 0.0)
    c.update(kw)
    return c


def test_rule_examples() -> None:
    rule = S.parse_rule("rolled_back>0 or failed_rate>2%")
    assert not rule.eval(m(targeted=100, failed=2, failed_rate=0.02))
    assert rule.eval(m(targeted=100, failed=3, failed_rate=0.03))
    assert rule.eval(m(rolled_back=1))
    r2 = S.parse_rule("not (committed >= 1) and (timed_out==2 OR refused != 0)")
    assert r2.eval(m(timed_out=2)) and not r2.eval(m(timed_out=2, committed=1))


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ("rolled_back>", "expected a number"),
        ("rollback>0", "unknown metric 'rollback'"),
        ("failed>2%", "a percentage compares with a rate"),
        ("failed>0 and", "expected a metric"),
        ("(failed>0", r"expected '\)'"),
        ("failed>0 failed>1", "'and', 'or' or the end"),
        ("failed=0", "unexpected"),
        ("", "expected a metric"),
    ],
)
def test_rule_errors(bad: str, msg: str) -> None:
    with pytest.raises(S.RolloutError, match=msg):
        S.parse_rule(bad)


_metric = st.sampled_from(sorted(S.METRICS))
_cmp = st.builds(
    S.Cmp, _metric, st.sampled_from([">", ">=", "<", "<=", "==", "!="]), st.integers(0, 20)
)
_rules = st.recursive(
    _cmp,
    lambda inner: st.one_of(
        st.builds(S.Not, inner),
        st.builds(
            S.BoolOp,
            st.sampled_from(["and", "or"]),
            st.lists(inner, min_size=2, max_size=3).map(tuple),
        ),
    ),
    max_leaves=8,
)


@given(_rules, st.dictionaries(_metric, st.integers(0, 20)))
def test_rule_text_round_trips_and_evaluates_the_same(rule: S.Rule, values: dict[str, int]) -> None:
    again = S.parse_rule(S.rule_text(rule))
    metrics = m(**{k: float(v) for k, v in values.items()})
    assert again.eval(metrics) == rule.eval(metrics)


@given(st.text(max_size=40))
def test_rule_parser_never_crashes_on_junk(text: str) -> None:
    try:
        S.parse_rule(text)
    except S.RolloutError:
        pass


# --------------------------------------------------------------------------- machine


def gateways(n: int, running: str | None = "1.0.0") -> list[R.Candidate]:
    return [R.Candidate(f"gw-{i:02d}", f"plant-{i % 3}", running) for i in range(n)]


def new(n: int = 12, halt: str = "rolled_back>0 or failed_rate>2%", **kw: Any) -> R.Rollout:
    args: dict[str, Any] = {"halt_if": halt, "soak_s": 60.0, "timeout_s": 600.0}
    args.update(kw)
    return R.plan("r1", "motor-ae", "2.1.0", gateways(n), S.parse_waves("1,10%,50%,100%"), **args)


def sent(actions: list[R.Action]) -> list[str]:
    return [g for a in actions if isinstance(a, R.Send) for g in a.gateways]


def test_good_rollout_goes_wave_by_wave_with_soak() -> None:
    r = new()
    assert r.waves == [1, 2, 6, 12]
    acts = R.tick(r, 0.0)
    first = sent(acts)
    assert len(first) == 1 and r.targets[first[0]].status == "sent"
    assert R.observe(r, first[0], ("fetching", None), 1.0) == []
    acts = R.observe(r, first[0], ("committed", None), 5.0)
    assert acts == [R.WaveDone(0)] and r.state == "soaking"
    assert R.tick(r, 64.9) == []  # soaking
    now = 65.0
    for wave in (1, 2, 3):
        members = sent(R.tick(r, now))
        assert len(members) == [1, 1, 4, 6][wave]
        for g in members:
            acts = R.observe(r, g, ("committed", None), now + 1)
        assert acts == [R.WaveDone(wave)]
        now += 61 + 1
    assert R.tick(r, now) == [R.Finished()]
    assert r.state == "succeeded" and r.counts()["committed"] == 12


def test_bad_bundle_halts_after_first_wave_and_says_why() -> None:
    r = new()
    (g,) = sent(R.tick(r, 0.0))
    acts = R.observe(r, g, ("rolled_back", "probation_faults"), 30.0)
    assert len(acts) == 1 and isinstance(acts[0], R.Halted)
    assert r.state == "halted"
    assert "rolled_back=1" in acts[0].reason and g in acts[0].reason
    assert "probation_faults" in acts[0].reason
    assert R.tick(r, 1e6) == []  # final: nothing more is ever sent
    assert [t.gateway for t in r.targets.values() if t.status != "pending"] == [g]


def test_timeout_counts_as_failed() -> None:
    r = new(halt="failed>0", timeout_s=100.0)
    (g,) = sent(R.tick(r, 0.0))
    R.observe(r, g, ("trial", None), 10.0)
    assert R.tick(r, 99.0) == []
    acts = R.tick(r, 100.0)
    assert isinstance(acts[0], R.Halted) and "timed_out=1" in acts[0].reason
    assert "last state trial" in (r.targets[g].reason or "")


def test_reports_recorded_before_the_tick_beat_the_timeout() -> None:
    """A tool resumed long after it stopped: the gateways committed meanwhile; recording
    all their reports before the tick keeps them from being judged timed out (deciding
    after each report would time out the ones not yet fed)."""
    r = new(n=12, halt="failed>0", timeout_s=100.0, soak_s=0.0)
    (g,) = sent(R.tick(r, 0.0))
    (g2,) = sent(R.observe(r, g, ("committed", None), 1.0))  # no soak: wave 2 at once
    third = sent(R.observe(r, g2, ("committed", None), 2.0))
    assert len(third) == 4
    naive = copy.deepcopy(r)
    for gw in third:
        R.observe(naive, gw, ("committed", None), 5000.0)
    assert naive.state == "halted" and naive.counts()["timed_out"] == 3
    for gw in third:
        R.record(r, gw, ("committed", None), 5000.0)
    acts = R.tick(r, 5000.0)
    assert r.state == "running" and r.counts()["failed"] == 0
    assert R.WaveDone(2) in acts


def test_failure_during_soak_trips_the_rule() -> None:
    r = new(halt="rolled_back>0")
    (g,) = sent(R.tick(r, 0.0))
    assert R.observe(r, g, ("committed", None), 1.0) == [R.WaveDone(0)]
    acts = R.observe(r, g, ("rolled_back", "drift"), 30.0)
    assert isinstance(acts[0], R.Halted) and r.targets[g].status == "failed"


def test_tolerated_failures_do_not_halt_and_rate_uses_reached_gateways() -> None:
    r = new(n=20, halt="failed_rate>25%", soak_s=0.0)
    now = 0.0
    acts = R.tick(r, now)
    while r.state not in R.FINAL_STATES:
        for i, g in enumerate(sent(acts)):
            # one failure in the 4-gateway wave
            outcome = (
                ("refused", "bad_sig") if r.targets[g].wave == 2 and i == 0 else ("committed", None)
            )
            acts = R.observe(r, g, outcome, now)
        now += 1
        acts = acts + R.tick(r, now)
    assert r.state == "succeeded"
    assert r.counts()["refused"] == 1 and r.counts()["committed"] == 19


def test_skipped_and_partial_last_wave() -> None:
    cands = [*gateways(4), R.Candidate("gw-new", "plant-0", "2.1.0")]
    r = R.plan(
        "r2", "m", "2.1.0", cands, S.parse_waves("2"), halt_if="failed>0", soak_s=0, timeout_s=9
    )
    assert r.targets["gw-new"].status == "skipped" and r.waves == [2]
    for g in sent(R.tick(r, 0.0)):
        R.observe(r, g, ("committed", None), 1.0)
    assert r.state == "succeeded"
    assert sum(t.status == "pending" for t in r.targets.values()) == 2  # never reached
    with pytest.raises(S.RolloutError, match="already run"):
        R.plan(
            "r3",
            "m",
            "2.1.0",
            cands[-1:],
            S.parse_waves("1"),
            halt_if="failed>0",
            soak_s=0,
            timeout_s=9,
        )
    with pytest.raises(S.RolloutError, match="matched no gateway"):
        R.plan(
            "r3", "m", "2.1.0", [], S.parse_waves("1"), halt_if="failed>0", soak_s=0, timeout_s=9
        )


def test_abort_stops_and_names_reached_gateways() -> None:
    r = new()
    (g,) = sent(R.tick(r, 0.0))
    assert R.abort(r, "operator") == [g]
    assert r.state == "aborted" and R.tick(r, 1e9) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(0, 2**32), st.floats(0.0, 0.4))
def test_never_sends_past_a_tripped_rule(n: int, seed: int, p_fail: float) -> None:
    """Random gateway outcomes: every gateway that was sent to is in a wave no later than
    the one where the rule tripped, and an untripped rule reaches everyone."""
    rng = random.Random(seed)
    r = new(n=n, halt="failed>0", soak_s=float(rng.choice([0, 5])))
    now = 0.0
    acts = R.tick(r, now)
    tripped_wave = None
    for _ in range(1000):
        if r.final:
            break
        for g in sent(acts):
            fail = rng.random() < p_fail
            acts = R.observe(r, g, ("rolled_back", "x") if fail else ("committed", None), now)
            if r.state == "halted" and tripped_wave is None:
                tripped_wave = r.wave
        now += 1.0
        acts = acts + R.tick(r, now)
    assert r.final
    reached = [t for t in r.targets.values() if t.status != "pending"]
    if r.state == "halted":
        assert tripped_wave is not None
        assert all(t.wave <= tripped_wave for t in reached)
        assert r.counts()["failed"] >= 1
    else:
        assert r.state == "succeeded" and len(reached) == n


# --------------------------------------------------------------------------- reports


def test_model_outcome_reads_the_contract_fields() -> None:
    doc = reported(
        "gw-1",
        desired={"version": 5, "models": {"motor-ae": {"version": "2.1.0", "state": "trial"}}},
    )
    assert R.model_outcome(doc, "motor-ae", "2.1.0", 5) == ("trial", None)
    assert R.model_outcome(doc, "motor-ae", "2.1.0", 6) is None  # predates our document
    assert R.model_outcome(doc, "motor-ae", "3.0.0", 5) is None
    doc["desired"]["models"]["motor-ae"] = {
        "version": "2.1.0",
        "state": "rolled_back",
        "reason": "probation_faults",
    }
    assert R.model_outcome(doc, "motor-ae", "2.1.0", 5) == ("rolled_back", "probation_faults")
    old = reported("gw-1", desired={"version": 5, "outcome": "refused", "reason": "unsupported"})
    assert R.model_outcome(old, "motor-ae", "2.1.0", 5) == ("refused", "unsupported")
    ran = reported(
        "gw-1",
        desired={"version": 7},
        models=[{"name": "motor-ae", "version": "2.1.0", "state": "COMMITTED"}],
    )
    assert R.model_outcome(ran, "motor-ae", "2.1.0", 7) == ("committed", None)


def test_desired_keeps_the_config_patch() -> None:
    prev = {"config": {"logging": {"level": "debug"}}, "models": {"other": {"version": "1"}}}
    target = {"version": "2.1.0", "sha256": "ab" * 32, "size": 10}
    config, models = R.desired_with_target(prev, "motor-ae", target)
    assert config == {"logging": {"level": "debug"}}
    assert models == {"other": {"version": "1"}, "motor-ae": target}
    assert R.desired_with_target(prev, "other", None)[1] == {}
    assert R.next_desired_version(None, 3, 7) == 8 and R.next_desired_version() == 1


def test_model_outcome_prefers_sha256_and_desired_version_of_the_entry() -> None:
    sha = "ab" * 32
    entry = {"version": "2.1.0", "sha256": sha, "desired_version": 9, "state": "committed"}
    doc = reported("gw-1", desired={"version": 9, "models": {"motor-ae": entry}})
    assert R.model_outcome(doc, "motor-ae", "2.1.0", 9, sha) == ("committed", None)
    assert R.model_outcome(doc, "motor-ae", "2.1.0", 9, "cd" * 32) is None  # another file
    assert R.model_outcome(doc, "motor-ae", "2.1.0", 10, sha) is None  # an older answer


# --------------------------------------------------------------------------- overrides


def overridden_report(
    gw: str, desired_version: int, *, runs: str = "2.2.0", target: str = "2.1.0"
) -> dict[str, Any]:
    """What a gateway reports once a technician installed `runs` over our target with
    `edgerunctl update --override-twin` (docs/twin.md §5.2)."""
    entry = {
        "version": target,
        "desired_version": desired_version,
        "state": "overridden",
        "reason": "twin_override",
        "message": f"version {runs} installed locally over the target (socket:1000, --override-twin)",
        "active_version": runs,
        "override": {"version": runs, "source": "socket:1000", "at": 1796535990.1},
    }
    return reported(
        gw,
        desired={"version": desired_version, "models": {"motor-ae": entry}},
        models=[{"name": "motor-ae", "version": runs, "state": "COMMITTED", "twin_override": True}],
    )


def test_model_outcome_reads_an_override() -> None:
    doc = overridden_report("gw-1", 5)
    assert R.model_outcome(doc, "motor-ae", "2.1.0", 5) == ("overridden", "twin_override")
    assert R.model_outcome(doc, "motor-ae", "2.1.0", 6) is None  # an older document's
    # it already ran a newer override when our (older) target came: the pipeline refuses
    # to go back (version_rollback) and the override is what holds it
    entry = {"version": "2.1.0", "desired_version": 6, "state": "refused",
             "reason": "version_rollback", "active_version": "2.5.0"}  # fmt: skip
    before = reported(
        "gw-1",
        desired={"version": 6, "models": {"motor-ae": entry}},
        models=[
            {"name": "motor-ae", "version": "2.5.0", "state": "COMMITTED", "twin_override": True}
        ],
    )
    assert R.model_outcome(before, "motor-ae", "2.1.0", 6) == (
        "overridden", "twin_override (version_rollback: runs 2.5.0)",
    )  # fmt: skip
    # the same refusal without an override (it runs a newer version the normal way) is one
    del before["models"][0]["twin_override"]
    assert R.model_outcome(before, "motor-ae", "2.1.0", 6) == ("refused", "version_rollback")


def test_overridden_gateway_ends_its_wait_and_does_not_halt() -> None:
    """One gateway of a wave overridden by a technician: the wave moves on at once (not
    after the 600 s timeout), `failed_rate>2%` does not trip, the rollout succeeds with
    the gateway counted as overridden, and no later wave sends it anything."""
    r = new(n=12, halt="rolled_back>0 or failed_rate>2%", timeout_s=600.0, soak_s=0.0)
    sends: list[str] = []
    acts = R.tick(r, 0.0)
    now, dv, victim = 0.0, 1, None
    while not r.final and now < 10:
        members = sent(acts)
        sends += members
        acts = []
        for g in members:
            if victim is None and r.targets[g].wave == 2:  # one of the 4-gateway wave
                victim = g
                out = R.model_outcome(overridden_report(g, dv), "motor-ae", "2.1.0", dv)
            else:
                out = ("committed", None)
            R.record(r, g, out, now + 1)
        now += 1
        acts += R.tick(r, now)
    assert victim is not None
    assert r.state == "succeeded", r.reason  # within 10 s, not after the timeout
    t = r.targets[victim]
    assert (t.status, t.outcome, t.reason) == ("overridden", "overridden", "twin_override")
    c = r.counts()
    assert (c["overridden"], c["committed"], c["failed"], c["failed_rate"]) == (1, 11, 0, 0.0)
    assert c["targeted"] == 12 and c["overridden_rate"] == 1 / 12
    assert "overridden=1" in (r.reason or "")
    assert sorted(sends) == sorted(r.order)  # each gateway sent to once, the victim too
    assert victim in R.abort(r, "x")  # reached: a revert covers it


def test_override_during_the_soak_and_after() -> None:
    """A committed gateway overridden during the soak is counted as overridden (it no
    longer runs the version), not failed; if our version is installed after all it is
    committed again; a failure of our bundle is still a failure."""
    r = new(halt="failed>0")
    (g,) = sent(R.tick(r, 0.0))
    assert R.observe(r, g, ("committed", None), 1.0) == [R.WaveDone(0)]
    assert R.observe(r, g, ("overridden", "twin_override"), 10.0) == []
    assert r.state == "soaking" and r.targets[g].status == "overridden"
    assert r.counts()["committed"] == 0 and r.counts()["failed"] == 0
    assert g in r.dirty
    R.observe(r, g, ("fetching", None), 11.0)  # busy again: still overridden
    assert r.targets[g].status == "overridden" and r.targets[g].outcome == "overridden"
    R.observe(r, g, ("committed", None), 20.0)
    assert r.targets[g].status == "committed" and r.targets[g].done_at == 20.0
    R.observe(r, g, ("overridden", "twin_override"), 30.0)
    acts = R.observe(r, g, ("rolled_back", "probation_faults"), 40.0)
    assert isinstance(acts[0], R.Halted) and r.targets[g].status == "failed"
    assert "overridden" not in acts[0].reason and "rolled_back=1" in acts[0].reason


def test_halt_rule_may_name_overrides() -> None:
    r = new(halt="overridden_rate>50%")
    (g,) = sent(R.tick(r, 0.0))
    acts = R.observe(r, g, ("overridden", "twin_override"), 1.0)
    assert isinstance(acts[0], R.Halted) and "overridden=1" in acts[0].reason
