"""The per-uid token buckets behind the socket `attest` rate limit (pure, injected clock)."""

from __future__ import annotations

from edgerund.identity.ratelimit import PerKeyBuckets


def test_burst_then_rate_per_key() -> None:
    now = [0.0]
    b = PerKeyBuckets(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [b.take(1) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take(1)
    assert 0.49 < wait <= 0.5 and b.refused == 1
    assert b.take(2) == 0.0  # another uid has its own bucket
    now[0] += 0.5  # one token back for uid 1
    assert b.take(1) == 0.0 and b.take(1) > 0
    now[0] += 100  # refills to the burst, never beyond
    assert [b.take(1) for _ in range(4)][-1] > 0


def test_idle_buckets_are_forgotten() -> None:
    now = [0.0]
    b = PerKeyBuckets(rate_per_s=1.0, burst=2, clock=lambda: now[0])
    for uid in range(200):
        b.take(uid)
        now[0] += 0.05  # 200 clients over 10 s; a bucket refills fully in 2 s
    assert len(b._buckets) < 200  # only clients active within one refill period are kept
    now[0] += 10
    b.take(5000)
    assert len(b._buckets) <= 64
