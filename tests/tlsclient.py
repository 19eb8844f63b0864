"""Raw TLS clients for the listener tests: a workload certificate from the CA, a backend
sidecar in front of the echo app, HTTP/1.1 spoken by hand so that every byte and every
close is seen as it happens."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import yaml
from helpers import mint_token
from mesh import hostport, sidecar_config, start_echo, start_sidecar

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


def start_backend(
    tmp_path,
    ca,
    drain: float,
    inbound: dict | None = None,
    ca_extra: dict | None = None,
    log_level: str = "INFO",
    extra: dict | None = None,
):
    """backend's app and sidecar; `extra`: more of the sidecar's config (its keys)."""
    app = start_echo(tmp_path / "app.log")
    cfg = sidecar_config(
        tmp_path,
        "backend",
        ca,
        BACKEND,
        app=hostport(app.urls["echo"]),
        inbound_extra=inbound,
        ca_extra=ca_extra,
        token=mint_token(ca.home, BACKEND),
    )
    doc = yaml.safe_load(cfg.read_text())
    doc["drain_timeout"] = drain
    doc.update(extra or {})
    cfg.write_text(yaml.safe_dump(doc))
    return app, start_sidecar(cfg, log_level=log_level)


def wait_for(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
