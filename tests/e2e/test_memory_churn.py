"""Connection churn does not grow the sidecar: after thousands of new mTLS connections to its
inbound port (a full handshake with a client certificate and one GET through to the app
each), its resident memory, once idle, comes back near where it was before, and it
still answers.

A real request rather than a bare handshake: it is what callers do, and it takes the
whole inbound path (the HTTP/1.1 engine, the connection to the app, the access log).
Before sidecar/heap.py the sidecar grew 8.7 MiB over the first 1,000 such connections
and 20 MiB over 5,000, and kept all of it when idle; now it comes back within a MiB
(figures in docs/sidecar.md, "Memory").

The count: every connection is a full handshake on both sides, 3.5-4.5 ms of CPU each
in the sidecar and in the client on this shared 2-core machine (OpenSSL 3.0; about 2 ms
on a quiet core), so the issue's 20,000 take minutes here: `make test` runs 1,500,
well past the point where the growth shows, in 10-35 s. CHURN_CONNECTIONS=20000 runs
the issue's figure (its timeout grows with the count).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from e2e.protocol_rig import rss_kib
from helpers import tail
from mesh import admin_get, hostport
from tlsclient import client_context, connect, get, read_response, start_backend

CONNECTIONS = int(os.environ.get("CHURN_CONNECTIONS", "1500"))
# From repeat clients: each a new mTLS connection (its own TLS object, read buffer, app
# exchange) on a resumed session, at about half a full handshake's CPU here. The issue's
# 20,000 took 54 s of churn (80 s with start-up) on this 2-core machine, over its minute:
# `make test` runs 10,000 (about 30 s); CHURN_RESUMED_CONNECTIONS=20000 runs the figure.
RESUMED_CONNECTIONS = int(os.environ.get("CHURN_RESUMED_CONNECTIONS", "10000"))
WARM_UP = 300  # connections before the start figure: pools, caches, first-use allocations
PROCESSES, THREADS = 2, 32  # 64 connections at a time, on both cores
BOUND_MIB = 5.0  # idle after the churn vs idle before it (measured: +0.5 MiB)
CLIENT = Path(__file__).resolve().parents[1] / "churnclient.py"


def mib(pid: int) -> float:
    return rss_kib(pid) / 1024


def churn(
    where: str, pem: Path, ca: Path, count: int, timeout: float, resume: bool = False
) -> None:
    """`count` connections from PROCESSES client processes; every one must get its 200.
    `resume`: each client thread offers its last session (a repeat client)."""
    shares = [count // PROCESSES + (1 if i < count % PROCESSES else 0) for i in range(PROCESSES)]
    mode = ["resume"] if resume else []
    procs = [
        subprocess.Popen(
            [sys.executable, str(CLIENT), where, str(pem), str(ca), str(n), str(THREADS), *mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in shares
    ]
    try:
        deadline = time.monotonic() + timeout
        results = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"{count} connections did not finish within {timeout:g} s"
                ) from None
            assert p.returncode == 0, f"churn client failed:\n{tail(err)}"
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [e for r in results for e in r["errors"]]
    assert sum(r["ok"] for r in results) == count, f"failed connections, e.g. {failed}"


def settled(pid: int, timeout: float = 10) -> float:
    """RSS (MiB) once idle: the sidecar trims a second after the last connection; wait
    until two readings half a second apart agree within 0.2 MiB."""
    time.sleep(2)
    last, deadline = mib(pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = mib(pid)
        if abs(now - last) < 0.2:
            return now
        last = now
    return last


@pytest.mark.parametrize(
    "count,resume",
    [(CONNECTIONS, False), (RESUMED_CONNECTIONS, True)],
    ids=["full-handshakes", "resumed-sessions"],
)
def test_rss_returns_after_connection_churn(ca, tmp_path, count, resume):
    ctx = client_context(ca, tmp_path)  # also writes tmp_path/client.pem (chain and key)
    pem = tmp_path / "client.pem"
    app, sidecar = start_backend(tmp_path, ca, drain=1)
    try:
        pid = sidecar.proc.pid
        where = hostport(sidecar.urls["inbound"])
        churn(where, pem, ca.bundle, WARM_UP, timeout=30)
        start = settled(pid)
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], mib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            before = admin_get(sidecar, "/status")[1]["inbound_tls_sessions"]
            churn(where, pem, ca.bundle, count, timeout=max(60, count / 20), resume=resume)
            after = admin_get(sidecar, "/status")[1]["inbound_tls_sessions"]
        finally:
            done.set()
            sampler.join()
        took = time.monotonic() - t0
        end = settled(pid)
        figures = (
            f"RSS start {start:.1f} MiB, peak {peak[0]:.1f} MiB, idle after {count} "
            f"connections {end:.1f} MiB ({took:.1f} s, {count / took:.0f}/s; handshakes "
            f"{after['full'] - before['full']} full, {after['resumed'] - before['resumed']} "
            "resumed)"
        )
        print(figures)
        full, resumed = after["full"] - before["full"], after["resumed"] - before["resumed"]
        assert full + resumed == count, figures  # every one a new TLS connection
        if resume:  # a repeat client's connections: all but each thread's first resumed
            assert resumed >= count - PROCESSES * THREADS, figures
        assert end <= start + BOUND_MIB, (
            f"{figures}: more than {BOUND_MIB:g} MiB above the start\n"
            f"--- last lines of the sidecar's stderr:\n{tail(sidecar.err)}"
        )
        s = connect(ctx, where)  # and it still answers
        try:
            s.sendall(get("/after-churn"))
            head, body = read_response(s)
        finally:
            s.close()
        assert head.startswith(b"HTTP/1.1 200 "), figures
        assert json.loads(body)["path"] == "/after-churn"
    finally:
        sidecar.stop()
        app.stop()
