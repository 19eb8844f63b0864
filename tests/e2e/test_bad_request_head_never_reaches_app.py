"""A request head the sidecar refuses for its framing or its HTTP version never reaches the app.

An unknown or malformed `Transfer-Encoding` (`xchunked`, `gzip`, `chunked, gzip`,
...) and a request line that is not HTTP/1.0 or HTTP/1.1 (HTTP/0.9 with no
version, `HTTP/2.0`, `HTTP/1.2`, `http/1.1`) are answered 400, 501 or 505 by
the sidecar, on the inbound port (mTLS, a client certificate) and on the
outbound port (plain HTTP), and the app behind the backend's sidecar is not
even connected to: a raw TCP app records every byte it is sent.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading

import pytest
from conftest import BACKEND
from helpers import curl_enroll, mint_token, openssl_csr, run_meshca, start_ca
from mesh import hostport, sidecar_config, start_sidecar

CALLER = "spiffe://cluster.local/ns/tools/sa/raw"


class RecordingApp:
    """A loopback TCP app that records what it receives and answers each head with 200."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = bytearray()
        self.connections = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.received += data
                buf += data
                while b"\r\n\r\n" in buf:  # the control requests have no body
                    _, _, buf = buf.partition(b"\r\n\r\n")
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.connections, len(self.received)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rawhead")
    home = root / "ca"
    run_meshca("init", "--home", str(home))
    ca = start_ca(home)
    app = RecordingApp()
    procs = [ca]
    try:
        backend = start_sidecar(sidecar_config(root, "backend", ca, BACKEND, app=app.address))
        procs.append(backend)
        inbound = hostport(backend.urls["inbound"])
        frontend = start_sidecar(
            sidecar_config(
                root,
                "frontend",
                ca,
                "spiffe://cluster.local/ns/default/sa/frontend",
                services={"backend.default": {"endpoints": [inbound], "identity": BACKEND}},
            )
        )
        procs.append(frontend)
        key, csr = openssl_csr(root, "raw")
        status, doc = curl_enroll(ca, csr, mint_token(home, CALLER))
        assert status == 200, doc
        chain = root / "raw-chain.pem"
        chain.write_text(doc["certificate_chain"])
        ctx = ssl.create_default_context(cafile=str(ca.bundle))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(chain), str(key))
        yield {
            "app": app,
            "inbound": inbound,
            "outbound": hostport(frontend.urls["outbound"]),
            "tls": ctx,
        }
    finally:
        for p in reversed(procs):
            p.stop()
        app.close()


def send(env, port: str, data: bytes) -> bytes:
    """Send raw bytes to the inbound (TLS with a client certificate) or outbound port;
    return everything the sidecar answers until it closes."""
    host, p = env[port].split(":")
    sock = socket.create_connection((host, int(p)), timeout=15)
    if port == "inbound":
        sock = env["tls"].wrap_socket(sock)
    out = b""
    with sock:
        sock.sendall(data)
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            while chunk := sock.recv(65536):
                out += chunk
    return out


def request(port: str, line: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    """A request for either port: outbound needs the service's name in Host."""
    host = b"Host: backend.default\r\n"
    return line + b"\r\n" + host + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


BAD_TE = {
    "xchunked": (b"xchunked", 501),
    "gzip": (b"gzip", 501),
    "identity": (b"identity", 501),
    "gzip, chunked": (b"gzip, chunked", 501),
    "chunked, gzip": (b"chunked, gzip", 400),
    "chunked, chunked": (b"chunked, chunked", 400),
    "chunked with a parameter": (b"chunked;ext=1", 400),
}


@pytest.mark.parametrize("port", ["inbound", "outbound"])
@pytest.mark.parametrize("case", BAD_TE)
def test_bad_transfer_encoding_never_reaches_the_app(env, port, case):
    value, status = BAD_TE[case]
    before = env["app"].snapshot()
    out = send(
        env,
        port,
        request(
            port,
            b"POST /upload HTTP/1.1",
            b"Transfer-Encoding: " + value,
            body=b"5\r\nhello\r\n0\r\n\r\n",
        ),
    )
    assert out.startswith(b"HTTP/1.1 %d " % status), out
    assert env["app"].snapshot() == before, "the app must receive nothing"


@pytest.mark.parametrize("port", ["inbound", "outbound"])
def test_transfer_encoding_in_http10_never_reaches_the_app(env, port):
    before = env["app"].snapshot()
    out = send(
        env,
        port,
        request(port, b"POST /old HTTP/1.0", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
    )
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert env["app"].snapshot() == before


BAD_VERSION = {
    "HTTP/0.9 (no version)": (b"GET /\r\n", 400),
    "HTTP/0.9 then a blank line": (b"GET /\r\n\r\n", 400),
    "HTTP/0.9 with a header": (b"GET /\r\nHost: backend.default\r\n\r\n", 400),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: backend.default\r\n\r\n", 505),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\nHost: backend.default\r\n\r\n", 400),
    "lowercase http/1.1": (b"GET / http/1.1\r\nHost: backend.default\r\n\r\n", 400),
    "HTTP/1.10": (b"GET / HTTP/1.10\r\nHost: backend.default\r\n\r\n", 400),
}


@pytest.mark.parametrize("port", ["inbound", "outbound"])
@pytest.mark.parametrize("case", BAD_VERSION)
def test_bad_http_version_never_reaches_the_app(env, port, case):
    data, status = BAD_VERSION[case]
    before = env["app"].snapshot()
    out = send(env, port, data)
    assert out.startswith(b"HTTP/1.1 %d " % status), out
    assert env["app"].snapshot() == before, "the app must receive nothing"


@pytest.mark.parametrize("port", ["inbound", "outbound"])
def test_a_good_request_still_reaches_the_app(env, port):
    """The control: the same sidecars forward HTTP/1.0, HTTP/1.1 and chunked bodies."""
    before = env["app"].snapshot()
    out = send(env, port, request(port, b"GET /ok HTTP/1.1", b"Connection: close"))
    assert out.startswith(b"HTTP/1.1 200 "), out
    assert env["app"].snapshot()[1] > before[1]
    out = send(env, port, request(port, b"GET /old HTTP/1.0"))
    assert out.startswith(b"HTTP/1.1 200 "), out
