"""SIGTERM to a sidecar: it stops accepting, lets the request in flight finish (its response
says `Connection: close`), closes an idle kept-alive connection cleanly (TLS close_notify),
and exits 0; a request slower than `drain_timeout` is cut off and the exit is still 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import threading
import time

import pytest
import yaml
from helpers import mint_token
from mesh import app_log, hostport, sidecar_config, start_echo, start_sidecar

from meshca.client import EnrollmentClient, new_key_and_csr, private_key_pem

BACKEND = "spiffe://cluster.local/ns/default/sa/backend"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"


def client_context(ca, tmp_path) -> ssl.SSLContext:
    key, csr = new_key_and_csr()
    got = asyncio.run(
        EnrollmentClient(ca.url, ca.bundle.read_text()).enroll(csr, mint_token(ca.home, CLIENT))
    )
    pem = tmp_path / "client.pem"
    pem.write_bytes(got.chain_pem.encode() + private_key_pem(key))
    ctx = ssl.create_default_context(cafile=str(ca.bundle))
    ctx.check_hostname = False  # the backend is known by its SPIFFE ID, not 127.0.0.1
    ctx.load_cert_chain(str(pem))
    return ctx


def connect(ctx: ssl.SSLContext, where: str) -> ssl.SSLSocket:
    host, port = where.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=30)
    return ctx.wrap_socket(raw, suppress_ragged_eofs=False)  # an EOF without close_notify raises


def read_response(s: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One response with a Content-Length body: (head, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response head: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "closed in the middle of a body"
        body += chunk
    return head, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: backend\r\n\r\n".encode()


def start_post(s: ssl.SSLSocket, path: str, length: int) -> None:
    """Send a POST head with `Expect: 100-continue` and wait for the sidecar's 100: from
    then on the request is in flight (the sidecar parsed it and holds the exchange)."""
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: backend\r\nContent-Length: {length}\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    want = b"HTTP/1.1 100 Continue\r\n\r\n"
    got = b""
    while len(got) < len(want):
        chunk = s.recv(len(want) - len(got))
        assert chunk, got
        got += chunk
    assert got == want


def start_backend(tmp_path, ca, drain: float):
    app = start_echo(tmp_path / "app.log")
    cfg = sidecar_config(
        tmp_path,
        "backend",
        ca,
        BACKEND,
        app=hostport(app.urls["echo"]),
        token=mint_token(ca.home, BACKEND),
    )
    doc = yaml.safe_load(cfg.read_text())
    doc["drain_timeout"] = drain
    cfg.write_text(yaml.safe_dump(doc))
    return app, start_sidecar(cfg)


def wait_for(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


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
