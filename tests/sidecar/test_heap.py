"""When the heap keeper trims: after new connections, once they stop for a tick, or every
BUSY_INTERVAL seconds while they go on; never when nothing happened."""

from __future__ import annotations

import pytest

from sidecar.heap import BUSY_INTERVAL, TICK, HeapKeeper


def run(accepted_per_tick: list[int]) -> list[int]:
    """Ticks with that many new connections before each; the ticks at which it trimmed."""
    now = [0.0]
    trims: list[int] = []
    keeper = HeapKeeper(clock=lambda: now[0], trim=lambda pad: trims.append(pad) or 1)
    made = keeper.counting(lambda: object())
    trimmed = []
    for i, n in enumerate(accepted_per_tick):
        for _ in range(n):
            made()
        now[0] += TICK
        if keeper.due(now[0]):
            keeper.trim()
            trimmed.append(i)
    assert trims == [0] * len(trimmed)  # malloc_trim(0): keep no padding
    return trimmed


BUSY = int(BUSY_INTERVAL / TICK)


@pytest.mark.parametrize(
    ("ticks", "trimmed"),
    [
        ([0, 0, 0, 0], []),  # idle from the start: nothing to give back
        ([5, 0, 0, 0], [1]),  # a burst, then quiet: one trim, a tick after the last one
        ([5, 0, 5, 0, 0], [1, 3]),  # each burst once
        ([5] * (2 * BUSY + 1) + [0], [BUSY - 1, 2 * BUSY - 1, 2 * BUSY + 1]),  # sustained
    ],
)
def test_trims_after_connections_stop_or_every_busy_interval(ticks, trimmed):
    assert run(ticks) == trimmed


def test_counting_passes_the_factorys_protocol_through():
    keeper = HeapKeeper(trim=lambda pad: 0)
    made = keeper.counting(lambda: "protocol")
    assert [made(), made()] == ["protocol", "protocol"]
    assert keeper.accepted == 2
