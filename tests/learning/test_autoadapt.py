"""When `auto_adapt` starts an adaptation (AutoAdaptState.due, pure): drift that persisted
`auto_adapt_after_s` on a healthy plant; not an anomaly, not with a sensor fault or a loop
on its fallback rules; a refused fit waits for new blocks; a swap starts over."""

from __future__ import annotations

from edgerund.ports import ModelCounters
from edgerund.updates.adaptation import AutoAdaptState

RUNNER = object()


def c(state: str | None, blocks: int = 10, faults: int = 0) -> ModelCounters:
    return ModelCounters(
        inferences=blocks * 25,
        faults=0,
        nan_outputs=0,
        score_mean=5.0,
        drift_state=state,
        drift_blocks=blocks,
        drift_fault_blocks=faults,
    )


def test_persistent_drift_on_a_healthy_plant_is_due_after_the_delay() -> None:
    st = AutoAdaptState()
    assert not st.due(c("drift"), RUNNER, 0, now=100.0, after_s=30.0)
    assert not st.due(c("drift", 20), RUNNER, 0, now=120.0, after_s=30.0)
    assert st.due(c("drift", 30), RUNNER, 0, now=130.0, after_s=30.0)


def test_an_anomaly_or_no_monitor_is_never_due_and_restarts_the_clock() -> None:
    st = AutoAdaptState()
    assert not st.due(c("anomaly"), RUNNER, 0, now=0.0, after_s=0.0)
    assert not st.due(c(None), RUNNER, 0, now=1.0, after_s=0.0)
    assert st.due(c("drift"), RUNNER, 0, now=2.0, after_s=0.0)
    st2 = AutoAdaptState()
    st2.due(c("drift"), RUNNER, 0, now=0.0, after_s=10.0)
    st2.due(c("anomaly"), RUNNER, 0, now=5.0, after_s=10.0)  # a trip the drift does not explain
    assert not st2.due(c("drift"), RUNNER, 0, now=12.0, after_s=10.0)  # counts from 12 again
    assert st2.due(c("drift"), RUNNER, 0, now=22.0, after_s=10.0)


def test_a_sensor_fault_block_or_a_loop_on_fallback_is_not_a_healthy_plant() -> None:
    st = AutoAdaptState()
    st.due(c("drift"), RUNNER, 0, now=0.0, after_s=5.0)
    assert not st.due(c("drift", faults=1), RUNNER, 0, now=6.0, after_s=5.0)
    assert not st.due(c("drift", faults=1), RUNNER, 0, now=7.0, after_s=5.0)  # clock restarted
    assert not st.due(c("drift", faults=1), RUNNER, 3, now=13.0, after_s=5.0)  # fallback ticks
    assert not st.due(c("drift", faults=1), RUNNER, 3, now=14.0, after_s=5.0)
    assert st.due(c("drift", faults=1), RUNNER, 3, now=19.0, after_s=5.0)


def test_a_refused_fit_waits_for_new_blocks_and_a_swap_starts_over() -> None:
    st = AutoAdaptState()
    assert st.due(c("drift", 40), RUNNER, 0, now=0.0, after_s=0.0)
    st.retry_at_blocks = 72  # what a policy refusal at 40 blocks sets (32 more)
    assert not st.due(c("drift", 60), RUNNER, 0, now=1.0, after_s=0.0)
    assert st.due(c("drift", 72), RUNNER, 0, now=2.0, after_s=0.0)
    other = object()
    st.retry_at_blocks = 500
    assert st.due(c("drift", 3), other, 0, now=3.0, after_s=0.0)  # new runner: counts reset
    assert st.retry_at_blocks == 0
