"""Thousands of idle connections and a slowloris client against the inbound port, with the
sidecar's open-file limit lowered below the flood: the sidecar never runs out of file
descriptors (the connection limit holds them back in the backlog), keeps serving a client
that was already connected, still renews its certificate (a new connection to the CA) and
answers its admin endpoint; the slowloris client is cut off by the header timeout (408);
once the flood is gone, new clients are served again."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time

from mesh import admin_get, hostport
from tlsclient import client_context, connect, get, read_response, start_backend

FLOOD = 2000
LIMIT = 200
FD_LIMIT = 512  # below the flood; above 2 x LIMIT + what the sidecar needs besides


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_flood_and_slowloris(tmp_path, ca):
    app, sidecar = start_backend(
        tmp_path, ca, drain=1, inbound={"max_connections": LIMIT, "header_timeout": 2}
    )
    procs = [sidecar, app]
    flood: list[socket.socket] = []
    try:
        pid = sidecar.proc.pid
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
        ctx = client_context(ca, tmp_path)
        inbound = hostport(sidecar.urls["inbound"])
        host, port = inbound.rsplit(":", 1)
        regular = connect(ctx, inbound)  # a client connected before the flood
        regular.sendall(get("/before"))
        assert read_response(regular)[0].startswith(b"HTTP/1.1 200")

        slow: dict = {}

        def slowloris():
            s = connect(ctx, inbound)
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: backend\r\n")
            sent = 0
            try:
                for _ in range(60):  # one header byte a second, for a minute
                    s.sendall(b"X")
                    sent += 1
                    time.sleep(1)
            except OSError:
                pass
            try:
                slow["answer"] = s.recv(4096)
            except OSError as e:
                slow["answer"] = repr(e).encode()
            slow["sent"] = sent

        loris = threading.Thread(target=slowloris)
        loris.start()
        for _ in range(FLOOD):  # connect and say nothing, never close
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, int(port)))
            flood.append(s)
        time.sleep(1)
        # Service to others goes on while the flood is held back.
        for n in range(5):
            regular.sendall(get(f"/during/{n}"))
            assert read_response(regular)[0].startswith(b"HTTP/1.1 200")
            assert open_fds(pid) < FD_LIMIT
        status, doc = admin_get(sidecar, "/rotate", method="POST")
        assert status == 200, doc  # renewal: a new connection to the CA
        assert admin_get(sidecar, "/ready")[0] == 200
        loris.join(timeout=90)
        assert slow["answer"].startswith(b"HTTP/1.1 408"), slow
        assert slow["sent"] < 60, slow
        for s in flood:
            s.close()
        flood.clear()
        # New clients are served once the flood is gone (queued ones are dropped first).
        deadline = time.monotonic() + 60
        while True:
            try:
                fresh = connect(ctx, inbound)
                fresh.sendall(get("/after"))
                head = read_response(fresh)[0]
                fresh.close()
                break
            except (OSError, AssertionError):
                assert time.monotonic() < deadline, "not served after the flood"
                time.sleep(0.5)
        assert head.startswith(b"HTTP/1.1 200")
        regular.sendall(get("/end"))
        assert read_response(regular)[0].startswith(b"HTTP/1.1 200")
        assert sidecar.proc.poll() is None
        assert "Too many open files" not in sidecar.stderr
        assert "cannot accept" not in sidecar.stderr
    finally:
        for s in flood:
            s.close()
        for p in procs:
            p.stop()
