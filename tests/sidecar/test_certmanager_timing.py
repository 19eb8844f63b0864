"""Renewal timing and retry backoff are pure functions: tables."""

import datetime as dt

import pytest

from sidecar.identity.certmanager import backoff, renew_delay

T0 = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
DAY = dt.timedelta(hours=24)


@pytest.mark.parametrize(
    "now_offset,rand,expected",
    [
        (0, 0.5, 12 * 3600),  # half-life, middle of the jitter window
        (0, 0.0, 12 * 3600 - 2.4 * 3600),  # -10 % of the lifetime
        (0, 1.0, 12 * 3600 + 2.4 * 3600),  # +10 %
        (12 * 3600, 0.5, 0),  # due now
        (20 * 3600, 0.5, 0),  # overdue: at once, never negative
    ],
)
def test_renew_delay(now_offset, rand, expected):
    now = T0 + dt.timedelta(seconds=now_offset)
    assert renew_delay(T0, T0 + DAY, now, rand=rand) == pytest.approx(expected)


def test_renew_delay_never_past_90_percent():
    assert renew_delay(T0, T0 + DAY, T0, fraction=0.9, jitter=0.1, rand=1.0) == pytest.approx(
        0.9 * 24 * 3600
    )


@pytest.mark.parametrize(
    "attempt,rand,expected",
    [
        (1, 0.0, 0.25),
        (1, 1.0, 0.5),
        (2, 1.0, 1.0),
        (5, 1.0, 8.0),
        (20, 1.0, 60.0),
        (20, 0.0, 30.0),
        (1000, 1.0, 60.0),
    ],
)
def test_backoff(attempt, rand, expected):
    assert backoff(attempt, base=0.5, cap=60.0, rand=rand) == pytest.approx(expected)
