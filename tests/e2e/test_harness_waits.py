"""A wait of the test harness that gives up says why: the process exited (with its status) or
was not ready in time, followed by the last 30 lines of that process's log, never a bare
timeout and never a hang on a process that prints nothing."""

from __future__ import annotations

import sys

import pytest
from helpers import run_meshca, start_ca
from mesh import _spawn, sidecar_config, start_sidecar

NOISY = (
    "import sys, time\n"
    "for i in range(1, 101):\n"
    "    print(f'line {{i}}', file=sys.stderr, flush=True)\n"
    "print('fatal: {why}', file=sys.stderr, flush=True)\n"
    "{then}\n"
)


def test_a_process_that_exits_is_reported_with_its_status_and_log_tail():
    code = NOISY.format(why="bad config", then="sys.exit(3)")
    with pytest.raises(AssertionError) as e:
        _spawn([sys.executable, "-c", code, "x"], ["echo"], timeout=60)
    msg = str(e.value)
    assert "exited with status 3" in msg
    assert "line 72\nline 73\n" in msg and "line 100\nfatal: bad config" in msg
    assert "line 71\n" not in msg, "only the last 30 lines"


def test_a_silent_process_does_not_hang_the_wait():
    code = NOISY.format(why="stuck", then="time.sleep(600)")
    with pytest.raises(AssertionError) as e:
        _spawn([sys.executable, "-c", code, "x"], ["echo"], timeout=1)
    msg = str(e.value)
    assert "not ready after 1 s" in msg and "still to listen: echo" in msg
    assert "line 100\nfatal: stuck" in msg


def test_ca_that_cannot_start_shows_why(tmp_path):
    with pytest.raises(AssertionError) as e:
        start_ca(tmp_path / "no-such-home")
    msg = str(e.value)
    assert "meshca serve exited with status" in msg
    assert f"no CA in {tmp_path / 'no-such-home'}" in msg


def test_sidecar_that_never_gets_ready_shows_its_log(tmp_path):
    """A sidecar whose CA is not answering listens but never holds a certificate."""
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    ca = start_ca(home)
    try:
        config = sidecar_config(tmp_path, "s", ca, "spiffe://cluster.local/ns/default/sa/s")
    finally:
        ca.stop()  # gone before the sidecar enrolls
    with pytest.raises(AssertionError) as e:
        start_sidecar(config, ready_timeout=2)
    msg = str(e.value)
    assert "the sidecar not ready after 2 s" in msg
    log = msg.split("--- last lines of its stderr:\n", 1)[1]
    assert ca.url.removeprefix("https://") in log or "enroll" in log.lower(), msg
