"""SIGTERM to a sidecar: it stops accepting, lets the request in flight finish (its response
says `Connection: close`), closes an idle kept-alive connection cleanly (TLS close_notify),
and exits 0; a request slower than `drain_timeout` is cut off and the exit is still 0."""

from __future__ import annotations

import signal
import ssl
import threading

import pytest
from mesh import app_log, hostport
from tlsclient import (
    client_context,
    connect,
    get,
    read_response,
    start_backend,
    start_post,
    wait_for,
)


def test_in_flight_finishes_idle_closes_cleanly_exit_0(tmp_path, ca):
    app, sidecar = start_backend(tmp_path, ca, drain=20)
    procs = [sidecar, app]
    try:
        ctx = client_context(ca, tmp_path)
        inbound = hostport(sidecar.urls["inbound"])
        idle = connect(ctx, inbound)
        idle.sendall(get("/before"))
        head, _ = read_response(idle)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        busy = connect(ctx, inbound)
        start_post(busy, "/in-flight?delay=1", 5)
        answer: dict = {}

        def read_busy():
            try:
                answer["head"], answer["body"] = read_response(busy)
                answer["after"] = busy.recv(1)  # b"" only after close_notify
            except Exception as e:  # reported below
                answer["error"] = e

        reader = threading.Thread(target=read_busy)
        reader.start()
        sidecar.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "sidecar: stopping" in sidecar.stdout, "the sidecar to start draining")
        # The idle kept-alive connection is closed cleanly: close_notify, then EOF.
        assert idle.recv(1) == b""
        # No new connections.
        with pytest.raises(OSError):
            connect(ctx, inbound).sendall(get("/after"))
        busy.sendall(b"hello")  # the body of the request in flight
        reader.join(timeout=30)
        assert "error" not in answer, answer.get("error")
        assert answer["head"].startswith(b"HTTP/1.1 200"), answer["head"]
        assert b"connection: close" in answer["head"].lower()
        assert answer["after"] == b""
        assert b'"body_bytes": 5' in answer["body"]
        assert [r["path"] for r in app_log(tmp_path / "app.log")] == ["/before", "/in-flight"]
        assert sidecar.proc.wait(timeout=30) == 0
        assert "sidecar: stopped" in sidecar.stdout
    finally:
        for p in procs:
            p.stop()


def test_drain_time_is_bounded(tmp_path, ca):
    app, sidecar = start_backend(tmp_path, ca, drain=1)
    procs = [sidecar, app]
    try:
        ctx = client_context(ca, tmp_path)
        busy = connect(ctx, hostport(sidecar.urls["inbound"]))
        start_post(busy, "/stuck?delay=60", 5)
        busy.sendall(b"hello")
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(timeout=30) == 0
        assert "drain time over: closed 1 busy connection" in sidecar.stdout
        with pytest.raises((ssl.SSLError, OSError, AssertionError)):
            read_response(busy)  # cut off: no answer
    finally:
        for p in procs:
            p.stop()
