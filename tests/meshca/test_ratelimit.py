"""Token-bucket rate limiting with a fake clock."""

import pytest

from meshca.ratelimit import RateLimiter


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_burst_then_refill():
    clock = Clock()
    rl = RateLimiter(rate=10, burst=20, clock=clock)
    assert [rl.check("a") for _ in range(20)] == [0.0] * 20
    wait = rl.check("a")
    assert wait == pytest.approx(0.1)
    clock.t += 0.1
    assert rl.check("a") == 0.0
    assert rl.check("a") > 0


def test_keys_are_independent():
    rl = RateLimiter(rate=1, burst=1, clock=Clock())
    assert rl.check("a") == 0.0 and rl.check("a") > 0
    assert rl.check("b") == 0.0


def test_refill_is_capped_at_burst():
    clock = Clock()
    rl = RateLimiter(rate=1, burst=2, clock=clock)
    rl.check("a")
    clock.t += 3600
    assert [rl.check("a") == 0.0 for _ in range(3)] == [True, True, False]


def test_idle_buckets_are_pruned():
    clock = Clock()
    rl = RateLimiter(rate=10, burst=10, clock=clock, max_keys=100)
    for i in range(100):
        rl.check(f"k{i}")
    clock.t += 5  # all full again
    rl.check("new")
    assert len(rl) <= 2


@pytest.mark.parametrize("rate,burst", [(0, 1), (-1, 1), (1, 0)])
def test_bad_settings(rate, burst):
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)
