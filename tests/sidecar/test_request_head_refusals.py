"""Request heads the proxy refuses before routing: bad transfer codings and HTTP versions.

Driven through the real `DownstreamConn` with an in-memory transport: for each
refused head the router is never asked (so nothing can go upstream) and the
client gets the status and error code a user would see.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.engines.base import Limits
from sidecar.engines.http1.downstream import DownstreamConn
from sidecar.engines.http1.framing import check_transfer_encoding, check_version
from sidecar.engines.http1.router import Router
from sidecar.errors import SidecarError


class FakeTransport(asyncio.Transport):
    """Collects what the proxy writes to the client."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class RecordingRouter(Router):
    """Records each routed request and answers it itself (no upstream)."""

    direction = "test"

    def __init__(self) -> None:
        self.routed: list[bytes] = []

    def route(self, conn, ex):
        self.routed.append(ex.target)
        raise SidecarError("method_not_allowed", "routed")


def feed(*pieces: bytes) -> tuple[RecordingRouter, bytes, bool]:
    async def run():
        router = RecordingRouter()
        conn = DownstreamConn(router, Limits(), None)
        transport = FakeTransport()
        conn.connection_made(transport)
        for piece in pieces:
            if transport.closed:
                break
            conn.data_received(piece)
        conn.connection_lost(None)
        return router, bytes(transport.out), transport.closed

    return asyncio.run(run())


def status_and_code(out: bytes) -> tuple[int, str]:
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


BAD_TE = {
    "xchunked": (b"xchunked", 501, "unsupported_transfer_encoding"),
    "gzip alone": (b"gzip", 501, "unsupported_transfer_encoding"),
    "identity": (b"identity", 501, "unsupported_transfer_encoding"),
    "gzip then chunked": (b"gzip, chunked", 501, "unsupported_transfer_encoding"),
    "unknown then chunked": (b"xchunked,chunked", 501, "unsupported_transfer_encoding"),
    "chunked then gzip": (b"chunked, gzip", 400, None),
    "chunked twice": (b"chunked, chunked", 400, None),
    "empty element": (b"chunked,", 400, None),
    "leading empty element": (b", chunked", 400, None),
    "parameter": (b"chunked;x=1", 400, None),
    "not a token": (b"chun ked", 400, None),
}


@pytest.mark.parametrize("case", BAD_TE)
def test_bad_transfer_encoding_is_refused_before_routing(case):
    value, status, code = BAD_TE[case]
    router, out, closed = feed(
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + value + b"\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert router.routed == []
    assert status_and_code(out)[0] == status, out
    if code:
        assert status_and_code(out)[1] == code
    assert closed and b"connection: close" in out


@pytest.mark.parametrize(
    "head",
    [
        b"POST /up HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # RFC 9112 6.1
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n"
        b"Content-Length: 5\r\n\r\nhello",
    ],
)
def test_other_framing_faults_are_refused_before_routing(head):
    router, out, _ = feed(head)
    assert router.routed == []
    assert status_and_code(out)[0] in (400, 501), out


def test_chunked_in_any_case_and_spacing_is_accepted():
    for value in (b"chunked", b"Chunked", b"CHUNKED", b"  chunked\t"):
        router, _, _ = feed(
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + value + b"\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        assert router.routed == [b"/up"], value


BAD_VERSIONS = {
    "HTTP/0.9 (no version), alone": ([b"GET /\r\n"], 400),
    "HTTP/0.9, LF only": ([b"GET /\n"], 400),
    "HTTP/0.9, CR and LF apart": ([b"GET /", b"\r", b"\n"], 400),
    "HTTP/0.9 with a blank line": ([b"GET /\r\n\r\n"], 400),
    "HTTP/0.9 with headers": ([b"GET /\r\nHost: a\r\n\r\n"], 400),
    "explicit HTTP/0.9": ([b"GET / HTTP/0.9\r\nHost: a\r\n\r\n"], 400),
    "HTTP/2.0 in an HTTP/1 request line": ([b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"], 505),
    "HTTP/1.2": ([b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"], 400),
    "HTTP/3.0": ([b"GET / HTTP/3.0\r\nHost: a\r\n\r\n"], 400),
    "HTTP/1.10": ([b"GET / HTTP/1.10\r\nHost: a\r\n\r\n"], 400),
    "lowercase http/1.1": ([b"GET / http/1.1\r\nHost: a\r\n\r\n"], 400),
    "no slash": ([b"GET / HTTP1.1\r\nHost: a\r\n\r\n"], 400),
    "trailing space": ([b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n"], 400),
    "h2 preface": ([b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], 400),
}


@pytest.mark.parametrize("case", BAD_VERSIONS)
def test_bad_http_versions_are_refused_before_routing(case):
    pieces, status = BAD_VERSIONS[case]
    router, out, closed = feed(*pieces)
    assert router.routed == []
    assert out.startswith(b"HTTP/1.1 %d " % status), out
    assert closed


def test_http_09_on_a_kept_alive_connection_is_refused_when_its_head_ends():
    router, out, _ = feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /\r\n", b"\r\n")
    assert router.routed == [b"/ok"]
    assert out.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400 " in out


@pytest.mark.parametrize(
    "pieces",
    [
        [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"],
        [b"GET / HTTP/1.0\r\n\r\n"],
        [b"GET / HTTP/1.1\r\n", b"Host: a\r\n\r\n"],
        [b"GET /a", b"b HTTP/1.1\r", b"\nHost: a\r\n\r\n"],
    ],
)
def test_http_10_and_11_are_routed(pieces):
    router, out, _ = feed(*pieces)
    assert len(router.routed) == 1 and out.startswith(b"HTTP/1.1 405 ")


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_check_version_accepts_http1(version):
    check_version(version)


@pytest.mark.parametrize("version,status", [("0.9", 400), ("2.0", 505), ("0.0", 505)])
def test_check_version_refuses(version, status):
    with pytest.raises(SidecarError) as e:
        check_version(version)
    assert e.value.status == status and e.value.close


def test_check_transfer_encoding_table():
    check_transfer_encoding(b"chunked", "1.1")
    with pytest.raises(SidecarError) as e:
        check_transfer_encoding(b"chunked", "1.0")
    assert e.value.status == 400
    with pytest.raises(SidecarError) as e:
        check_transfer_encoding(b"xchunked", "1.1")
    assert e.value.status == 501 and "xchunked" in e.value.detail


@pytest.mark.parametrize(
    "after",
    [b"GET /\r\n\r\n", b"POST /x HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n"],
)
def test_a_bad_head_after_an_upgrade_request_is_refused_not_an_internal_error(after):
    """An upgrade the sidecar does not offer (h2c) stops llhttp; the bytes after that head
    are parsed as the next request."""
    head = b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
    router, out, _ = feed(head + after)
    assert router.routed[:1] == [b"/up"]
    assert b" 500 " not in out and out.count(b"HTTP/1.1 ") == 2, out
    assert out.startswith(b"HTTP/1.1 405 ")


@pytest.mark.parametrize("after", [b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /\r\n\r\n"])
def test_a_refused_connect_closes_and_what_follows_is_never_parsed(after):
    """CONNECT where no tunnel is offered (the base router, the inbound side): one 405, the
    connection closes, and the bytes meant for the tunnel are never read as requests."""
    router, out, closed = feed(b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n" + after)
    assert router.routed == []
    assert out.startswith(b"HTTP/1.1 405 ") and out.count(b"HTTP/1.1 ") == 1, out
    assert closed
