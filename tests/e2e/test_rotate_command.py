"""meshca rotate on a state directory: stages one per run, dry run, concurrency, crashes.

Each run takes at most one step; two runs at once end in one consistent state;
a run killed (SIGKILL) at any point leaves a state that loads, and the next run
completes the step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import run_meshca

from meshca.authority import Authority

WAITS = ("--propagation-wait", "1", "--retire-wait", "1")
SLOW = ("--propagation-wait", "3", "--retire-wait", "3")  # longer than a process start


def rotate(home, *args, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "meshca", "rotate", "--home", str(home), "--json", *WAITS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    if check:
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    return proc


def stage(home, waits=WAITS):
    doc = json.loads(run_meshca("status", "--home", str(home), "--json", *waits).stdout)
    return doc["root_rotation"]["stage"], len(doc["roots"]), doc["bundle_sequence"]


def test_full_root_rotation_one_stage_per_run(ca_home):
    old = Authority.load(ca_home)
    assert rotate(ca_home, *SLOW)["action"] == "none"
    dry = rotate(ca_home, *SLOW, "--start-root-rotation", "--dry-run")
    assert dry["action"] == "prepare_root" and dry["dry_run"]
    assert stage(ca_home, SLOW) == ("none", 1, 1), "a dry run changes nothing"
    assert rotate(ca_home, *SLOW, "--start-root-rotation")["action"] == "prepare_root"
    assert stage(ca_home, SLOW) == ("prepared", 2, 2)
    assert rotate(ca_home, *SLOW)["action"] == "none", "the propagation wait is not over"
    time.sleep(3.1)
    assert rotate(ca_home, *SLOW)["action"] == "activate_root"
    mid = Authority.load(ca_home)
    assert mid.intermediate.issuer != old.intermediate.issuer  # issuing under the new root
    assert stage(ca_home, SLOW) == ("activated", 2, 2)
    time.sleep(3.1)
    assert rotate(ca_home, *SLOW)["action"] == "retire_root"
    assert stage(ca_home, SLOW) == ("none", 1, 3)
    new = Authority.load(ca_home)
    assert new.roots[0].subject != old.roots[0].subject
    events = [
        e
        for e in json.loads(run_meshca("status", "--home", str(ca_home), "--json").stdout)["roots"]
    ]
    assert len(events) == 1
    human = subprocess.run(
        [sys.executable, "-m", "meshca", "rotate", "--home", str(ca_home), "--force-intermediate"],
        capture_output=True,
        text=True,
    ).stdout
    assert "did rotate intermediate" in human


def test_old_root_stays_while_its_leaves_are_valid(tmp_path, ca):
    """Retirement waits for every leaf under the old root to expire, whatever the wait says."""
    from helpers import curl_enroll, mint_token, openssl_csr

    _, csr = openssl_csr(tmp_path, "w")
    assert curl_enroll(ca, csr, mint_token(ca.home, "spiffe://cluster.local/ns/a/sa/b"))[0] == 200
    rotate(ca.home, "--start-root-rotation")
    time.sleep(1.1)
    rotate(ca.home)
    time.sleep(1.1)
    res = rotate(ca.home)
    assert res["action"] == "none" and "leaves expire" in res["reason"]
    assert res["next_due"] > time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))


def test_two_runs_at_once_end_consistent(ca_home):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshca",
                "rotate",
                "--home",
                str(ca_home),
                "--json",
                "--start-root-rotation",
                *WAITS,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sorted(o["action"] for o in outs) == ["activate_root", "prepare_root"] or sorted(
        o["action"] for o in outs
    ) == ["none", "prepare_root"]
    st, roots, _ = stage(ca_home)
    assert roots == 2 and st in ("prepared", "activated")
    Authority.load(ca_home)


def test_no_wait_refuses_while_locked(ca_home):
    from meshca import store

    with store.locked(ca_home):
        proc = rotate(ca_home, "--no-wait", check=False)
    assert proc.returncode == 1 and "locked by another meshca command" in proc.stderr


STEPS = [
    ("prepare_root", ["--start-root-rotation"]),
    ("activate_root", []),
    ("retire_root", []),
    ("rotate_intermediate", ["--force-intermediate"]),
]


@pytest.mark.parametrize("point", ["before-state", "after-state"])
@pytest.mark.parametrize("action,args", STEPS)
def test_killed_at_each_boundary_then_next_run_completes(ca_home, point, action, args):
    # bring the CA to the stage just before `action`
    if action == "activate_root":
        rotate(ca_home, "--start-root-rotation")
        time.sleep(1.1)
    elif action == "retire_root":
        rotate(ca_home, "--start-root-rotation")
        time.sleep(1.1)
        rotate(ca_home)
        time.sleep(1.1)
    before = stage(ca_home)
    proc = rotate(ca_home, *args, env={"MESHCA_FAULT": f"rotate:{point}"}, check=False)
    assert proc.returncode == -9, proc.stderr  # SIGKILL
    Authority.load(ca_home)  # whatever happened, the state loads
    if point == "before-state":
        assert stage(ca_home) == before, "nothing changed before state.json was replaced"
        assert rotate(ca_home, *args)["action"] == action
    else:
        assert stage(ca_home) != before or action == "rotate_intermediate"
        again = rotate(ca_home)
        assert again["action"] in ("none", "activate_root", "retire_root")
    Authority.load(ca_home)
