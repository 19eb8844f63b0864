"""Rotation decisions, pure: given the time and the CA's state, what one step to take next.

The issuing intermediate is replaced when it is past a share of its lifetime
(default 2/3) or when forced. The root rotates in three stages, at most one
per run, each after its wait:

    none --prepare--> prepared --activate--> activated --retire--> none

- prepare: a new root is made and published in the bundle beside the old one;
  issuing stays under the old root (so every peer learns the new root first);
- activate (after `propagation_wait`): issuing moves to a new intermediate
  under the new root; the old root stays trusted;
- retire (after `retire_wait`, the longest leaf lifetime plus a margin, *and*
  once no unexpired leaf from the old root's intermediates is left in the
  ledger): the old root leaves the bundle.

I/O (keys, files, the lock) lives in `meshca.rotate`; this module only decides.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from meshca import defaults

DEFAULT_SHARE = defaults.ROTATION_SHARE
DEFAULT_PROPAGATION_WAIT = defaults.PROPAGATION_WAIT
DEFAULT_RETIRE_WAIT = defaults.RETIRE_WAIT


class Stage(StrEnum):
    """Where a root rotation stands (the value is what state.json and the API say)."""

    NONE = "none"
    PREPARED = "prepared"
    ACTIVATED = "activated"


class Action(StrEnum):
    """One step `meshca rotate` may take."""

    NONE = "none"
    ROTATE_INTERMEDIATE = "rotate_intermediate"
    PREPARE_ROOT = "prepare_root"
    ACTIVATE_ROOT = "activate_root"
    RETIRE_ROOT = "retire_root"


NONE, PREPARED, ACTIVATED = Stage.NONE, Stage.PREPARED, Stage.ACTIVATED
STAGES = tuple(Stage)


@dataclass(frozen=True)
class Settings:
    """How eagerly to rotate."""

    intermediate_share: float = DEFAULT_SHARE
    root_share: float = DEFAULT_SHARE
    propagation_wait: dt.timedelta = DEFAULT_PROPAGATION_WAIT
    retire_wait: dt.timedelta = DEFAULT_RETIRE_WAIT


@dataclass(frozen=True)
class Facts:
    """What the decision looks at."""

    now: dt.datetime
    root_not_before: dt.datetime  # the root that issues now
    root_not_after: dt.datetime
    intermediate_not_before: dt.datetime
    intermediate_not_after: dt.datetime
    stage: str = NONE
    stage_since: dt.datetime | None = None
    old_root_leaves_until: dt.datetime | None = None  # latest not_after of old-root leaves
    old_root_leaves: int = 0  # how many unexpired, unrevoked leaves the old root still has


@dataclass(frozen=True)
class Plan:
    """One step (or none), why, and when the next step is due."""

    action: Action
    reason: str
    next_due: dt.datetime | None = None


def _past_share(nb: dt.datetime, na: dt.datetime, now: dt.datetime, share: float) -> bool:
    return now >= nb + (na - nb) * share


def _share_point(nb: dt.datetime, na: dt.datetime, share: float) -> dt.datetime:
    return nb + (na - nb) * share


def plan(
    f: Facts,
    s: Settings = Settings(),
    force_intermediate: bool = False,
    start_root_rotation: bool = False,
    force_retire: bool = False,
) -> Plan:
    """The next step. At most one stage advances per call; a forced intermediate goes first.

    `force_retire` retires the old root at once in the activated stage, whatever the
    waits and the leaves under it say (an emergency: the old root's key is compromised);
    holders of those leaves lose trust at once and must enroll again.
    """
    if force_intermediate:
        return Plan(Action.ROTATE_INTERMEDIATE, "forced (--force-intermediate)")
    if force_retire:
        if f.stage != ACTIVATED:
            return Plan(Action.NONE, f"--force-retire: nothing to retire in the {f.stage} stage")
        why = "forced (--force-retire)"
        if f.old_root_leaves:
            why += f"; {f.old_root_leaves} unexpired leaf certificate(s) lose trust"
        return Plan(Action.RETIRE_ROOT, why)
    if f.stage == PREPARED:
        assert f.stage_since is not None
        due = f.stage_since + s.propagation_wait
        if f.now >= due:
            return Plan(Action.ACTIVATE_ROOT, "the new root has had its propagation wait")
        return Plan(Action.NONE, "new root published; waiting for it to propagate", due)
    if f.stage == ACTIVATED:
        assert f.stage_since is not None
        due = f.stage_since + s.retire_wait
        if f.old_root_leaves_until is not None and f.old_root_leaves_until > due:
            due = f.old_root_leaves_until
        if f.now >= due:
            return Plan(Action.RETIRE_ROOT, "no certificate in use needs the old root any more")
        why = "issuing under the new root; the old root stays trusted until its leaves expire"
        return Plan(Action.NONE, why, due)
    if start_root_rotation:
        return Plan(Action.PREPARE_ROOT, "started (--start-root-rotation)")
    if _past_share(f.root_not_before, f.root_not_after, f.now, s.root_share):
        return Plan(Action.PREPARE_ROOT, f"the root is past {s.root_share:.0%} of its lifetime")
    if _past_share(
        f.intermediate_not_before, f.intermediate_not_after, f.now, s.intermediate_share
    ):
        return Plan(
            Action.ROTATE_INTERMEDIATE,
            f"the intermediate is past {s.intermediate_share:.0%} of its lifetime",
        )
    due = min(
        _share_point(f.root_not_before, f.root_not_after, s.root_share),
        _share_point(f.intermediate_not_before, f.intermediate_not_after, s.intermediate_share),
    )
    return Plan(Action.NONE, "nothing is due", due)
