"""A listener at its connection limit (`inbound.max_connections`): the connections already
open keep working; a new one is queued (its TCP connect succeeds, nothing more happens)
and is served as soon as an open one closes."""

from __future__ import annotations

import threading

from mesh import hostport
from tlsclient import client_context, connect, get, read_response, start_backend

LIMIT = 3


def test_new_connection_waits_for_a_free_slot(tmp_path, ca):
    app, sidecar = start_backend(tmp_path, ca, drain=5, inbound={"max_connections": LIMIT})
    procs = [sidecar, app]
    held = []
    try:
        ctx = client_context(ca, tmp_path)
        inbound = hostport(sidecar.urls["inbound"])
        for n in range(LIMIT):
            s = connect(ctx, inbound)
            s.sendall(get(f"/open/{n}"))
            assert read_response(s)[0].startswith(b"HTTP/1.1 200")
            held.append(s)
        events: dict = {}
        tcp_up, answered = threading.Event(), threading.Event()

        def late_client():
            import socket

            try:
                host, port = inbound.rsplit(":", 1)
                raw = socket.create_connection((host, int(port)), timeout=60)
                tcp_up.set()  # accepted by the kernel (the backlog), not yet by the sidecar
                s = ctx.wrap_socket(raw)
                s.sendall(get("/late"))
                events["head"] = read_response(s)[0]
                s.close()
            except Exception as e:  # reported below
                events["error"] = e
            answered.set()

        late = threading.Thread(target=late_client)
        late.start()
        assert tcp_up.wait(30), events
        # The open connections keep working at the limit.
        for s in held:
            for n in range(3):
                s.sendall(get(f"/again/{n}"))
                assert read_response(s)[0].startswith(b"HTTP/1.1 200")
        assert not answered.is_set(), f"served past the limit: {events}"
        assert "connections open (the limit)" in sidecar.stderr
        held.pop(0).close()  # a slot frees up: the queued connection is served
        late.join(timeout=60)
        assert "error" not in events, events["error"]
        assert events["head"].startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
        for p in procs:
            p.stop()
