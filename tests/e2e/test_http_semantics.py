"""HTTP/1.1 details through both sidecars: HEAD, 204/304, chunked responses, HTTP/1.0,
pipelining, Connection: close, and errors from the app passed through unchanged."""

from __future__ import annotations

import json
import socket

import pytest
from mesh import app_log, hostport


def raw(mesh, data: bytes, until_close: bool = True) -> bytes:
    host, port = hostport(mesh.frontend.urls["outbound"]).split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            if not until_close and out.count(b"HTTP/1.1 ") >= 1 and out.endswith(b"}"):
                break
    return out


def split_responses(data: bytes) -> list[tuple[bytes, dict, bytes]]:
    """Parse a stream of responses (content-length or chunked)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        code = int(lines[0].split(b" ")[1])
        if code in (204, 304):
            body, data = b"", rest
        elif b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, data = rest[:n], rest[n:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    rest = rest[2:]
                    break
                body += rest[:size]
                rest = rest[size + 2 :]
            data = rest
        else:
            body, data = rest, b""
        out.append((lines[0], headers, body))
    return out


def test_head_has_no_body_and_keeps_the_connection(mesh):
    data = raw(
        mesh,
        b"HEAD http://backend.default/h HTTP/1.1\r\nHost: backend.default\r\n\r\n"
        b"GET http://backend.default/after-head HTTP/1.1\r\nHost: backend.default\r\n"
        b"Connection: close\r\n\r\n",
    )
    head_line = data.partition(b"\r\n\r\n")[0]
    assert head_line.startswith(b"HTTP/1.1 200")
    assert b"content-length:" in head_line.lower()
    rest = data.partition(b"\r\n\r\n")[2]
    assert rest.startswith(b"HTTP/1.1 200"), rest[:100]
    assert b'"/after-head"' in rest


def test_204_and_304_have_no_body(mesh):
    data = raw(
        mesh,
        b"GET http://backend.default/x?status=204 HTTP/1.1\r\nHost: b\r\n\r\n"
        b"GET http://backend.default/y?status=304 HTTP/1.1\r\nHost: b\r\n\r\n"
        b"GET http://backend.default/z HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    responses = split_responses(data)
    assert [r[0].split(b" ")[1] for r in responses] == [b"204", b"304", b"200"]
    assert responses[0][2] == b"" and responses[1][2] == b""
    assert json.loads(responses[2][2])["path"] == "/z"


def test_chunked_response_and_pipelining(mesh):
    reqs = (
        b"".join(
            b"GET http://backend.default/p%d?chunked=1 HTTP/1.1\r\nHost: b\r\n\r\n" % i
            for i in range(5)
        )
        + b"GET http://backend.default/last HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    )
    responses = split_responses(raw(mesh, reqs))
    assert [json.loads(r[2])["path"] for r in responses] == [f"/p{i}" for i in range(5)] + ["/last"]
    assert responses[0][1][b"transfer-encoding"] == b"chunked"
    assert responses[-1][1][b"connection"] == b"close"


def test_http10_client(mesh):
    data = raw(mesh, b"GET http://backend.default/old HTTP/1.0\r\n\r\n")
    status, headers, body = split_responses(data)[0]
    assert status.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["path"] == "/old"


def test_app_errors_pass_through(mesh):
    data = raw(
        mesh,
        b"GET http://backend.default/missing?status=404 HTTP/1.1\r\nHost: b\r\n"
        b"Connection: close\r\n\r\n",
    )
    status, _, body = split_responses(data)[0]
    assert status.startswith(b"HTTP/1.1 404") and json.loads(body)["path"] == "/missing"


def test_malformed_request_is_400(mesh):
    data = raw(mesh, b"GET /\x00bad HTTP/1.1\r\nHost: b\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400") and b'"bad_request"' in data


def test_conflicting_lengths_are_refused(mesh):
    data = raw(
        mesh,
        b"POST http://backend.default/smuggle HTTP/1.1\r\nHost: b\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 5\r\nContent-Length: 6\r\n",  # two lengths
        b"Content-Length: 5\r\nContent-Length: 5\r\n",  # the same length twice
        b"X-A: b\r\n folded\r\n",  # obsolete line folding
        b"X-A : b\r\n",  # whitespace before the colon
        b"Content-Length: +5\r\n",
        b"Content-Length: 0x5\r\n",
    ],
)
def test_framing_tricks_are_refused_before_the_app(mesh, head):
    before = len(app_log(mesh.app_log))
    data = raw(
        mesh,
        b"POST http://backend.default/smuggle2 HTTP/1.1\r\nHost: b\r\n" + head + b"\r\nhello!",
    )
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert len(app_log(mesh.app_log)) == before
