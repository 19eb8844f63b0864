"""Rotation decisions: a table over stages, waits, shares and flags."""

import datetime as dt

import pytest

from meshca.rotation_plan import ACTIVATED, NONE, PREPARED, Facts, Settings, plan

T = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
YEAR = dt.timedelta(days=365)
S = Settings(propagation_wait=dt.timedelta(hours=1), retire_wait=dt.timedelta(hours=25))


def facts(now, stage=NONE, since=None, int_age=0, root_age=0, leaves_until=None):
    return Facts(
        now=now,
        root_not_before=now - root_age * DAY,
        root_not_after=now - root_age * DAY + 10 * YEAR,
        intermediate_not_before=now - int_age * DAY,
        intermediate_not_after=now - int_age * DAY + YEAR,
        stage=stage,
        stage_since=since,
        old_root_leaves_until=leaves_until,
    )


@pytest.mark.parametrize(
    "f,kw,action",
    [
        (facts(T), {}, "none"),
        (facts(T, int_age=244), {}, "rotate_intermediate"),  # past 2/3 of a year
        (facts(T, int_age=200), {}, "none"),
        (facts(T), {"force_intermediate": True}, "rotate_intermediate"),
        (facts(T, root_age=2500), {}, "prepare_root"),  # past 2/3 of ten years
        (facts(T), {"start_root_rotation": True}, "prepare_root"),
        (facts(T, PREPARED, T - dt.timedelta(minutes=30)), {}, "none"),
        (facts(T, PREPARED, T - dt.timedelta(minutes=61)), {}, "activate_root"),
        (
            facts(T, PREPARED, T - dt.timedelta(minutes=61)),
            {"start_root_rotation": True},
            "activate_root",
        ),
        (facts(T, PREPARED, T), {"force_intermediate": True}, "rotate_intermediate"),
        (facts(T, ACTIVATED, T - dt.timedelta(hours=24)), {}, "none"),
        (facts(T, ACTIVATED, T - dt.timedelta(hours=26)), {}, "retire_root"),
        # an old-root leaf still valid holds retirement back, whatever the wait says
        (
            facts(T, ACTIVATED, T - dt.timedelta(hours=26), leaves_until=T + dt.timedelta(hours=1)),
            {},
            "none",
        ),
        # --force-retire: at once in the activated stage, leaves or not; nowhere else
        (
            facts(T, ACTIVATED, T, leaves_until=T + dt.timedelta(hours=1)),
            {"force_retire": True},
            "retire_root",
        ),
        (facts(T, PREPARED, T), {"force_retire": True}, "none"),
        (facts(T), {"force_retire": True}, "none"),
    ],
)
def test_plan(f, kw, action):
    assert plan(f, S, **kw).action == action


def test_next_due_is_reported():
    p = plan(facts(T, PREPARED, T - dt.timedelta(minutes=30)), S)
    assert p.next_due == T + dt.timedelta(minutes=30)
    p = plan(facts(T, ACTIVATED, T, leaves_until=T + dt.timedelta(hours=30)), S)
    assert p.next_due == T + dt.timedelta(hours=30)
    p = plan(facts(T), S)
    assert p.next_due == T + YEAR * 2 / 3


def test_forced_retire_says_how_many_leaves_lose_trust():
    f = Facts(**{**facts(T, ACTIVATED, T).__dict__, "old_root_leaves": 3})
    p = plan(f, S, force_retire=True)
    assert p.action == "retire_root"
    assert "3 unexpired leaf" in p.reason
