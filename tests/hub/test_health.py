"""The pure health state machine: transitions, and one log line per visible change."""

from __future__ import annotations

from edgerund.hub import health as hm


def run(events: list[hm.HealthEvent], fail_after: int = 3) -> tuple[hm.Health, list[object]]:
    h = hm.Health()
    out: list[object] = []
    for ev in events:
        h, actions = hm.step(h, ev, fail_after)
        out.extend(actions)
    return h, out


def logs(actions: list[object]) -> list[tuple[str, str, str]]:
    return [(a.event, a.from_state, a.to_state) for a in actions if isinstance(a, hm.LogTransition)]


def test_first_good_read_goes_ok_once() -> None:
    h, acts = run([hm.ReadOk()] * 5)
    assert h.state == "ok"
    assert logs(acts) == [("sensor_ok", "starting", "ok")]


def test_failures_below_threshold_are_silent_and_reset() -> None:
    h, acts = run(
        [
            hm.ReadOk(),
            hm.ReadFailed("nack"),
            hm.ReadFailed("nack"),
            hm.ReadOk(),
            hm.ReadFailed("nack"),
            hm.ReadFailed("nack"),
        ]
    )
    assert h.state == "ok"
    assert h.consecutive_failures == 2
    assert logs(acts) == [("sensor_ok", "starting", "ok")]
    assert not any(isinstance(a, hm.Reprobe) for a in acts)


def test_fail_after_then_silent_retries_then_one_recovery() -> None:
    evs: list[hm.HealthEvent] = [hm.ReadOk()] + [hm.ReadFailed("EIO")] * 3
    h, acts = run(evs)
    assert h.state == "failed"
    assert logs(acts)[-1] == ("sensor_failed", "ok", "failed")
    pub = [a for a in acts if isinstance(a, hm.PublishState)]
    assert pub[-1].state == "failed" and "EIO" in pub[-1].reason
    # 50 more failing re-probes: each asks for a re-probe, none logs
    h2 = h
    more: list[object] = []
    for _ in range(50):
        h2, a = hm.step(h2, hm.OpenFailed("no ACK"), 3)
        more.extend(a)
        h2, a = hm.step(h2, hm.ReadFailed("EIO"), 3)
        more.extend(a)
    assert logs(more) == []
    assert sum(isinstance(a, hm.Reprobe) for a in more) == 100
    assert h2.last_error == "EIO"
    h3, a = hm.step(h2, hm.ReadOk(), 3)
    assert h3.state == "ok" and h3.consecutive_failures == 0
    assert logs(list(a)) == [("sensor_recovered", "failed", "ok")]


def test_absent_at_start_fails_at_once() -> None:
    h, acts = run([hm.OpenFailed("chip id 0x00, expected 0x60")])
    assert h.state == "failed"
    assert logs(acts) == [("sensor_failed", "starting", "failed")]
    assert any(isinstance(a, hm.Reprobe) for a in acts)


def test_disabled_is_terminal() -> None:
    h, acts = run([hm.ReadOk(), hm.Disable(), hm.ReadFailed("x"), hm.ReadOk()])
    assert h.state == "disabled"
    assert logs(acts)[-1] == ("sensor_disabled", "ok", "disabled")


def test_fail_after_one() -> None:
    h, _ = run([hm.ReadOk(), hm.ReadFailed("x")], fail_after=1)
    assert h.state == "failed"
