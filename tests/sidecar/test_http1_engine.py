"""The HTTP/1.1 forwarding engine as a state machine: byte sequences replayed against
in-memory transports, no sockets.

A client connection (`DownstreamConn`) and the app's connections (`UpstreamConn`, opened
through an `UpstreamPool` by a fake `connect`) each get a fake transport that records what
is written to it, whether it was closed or aborted, and when reading was paused. What the
app and the client receive is read back with separate llhttp parsers. Covered: pipelining
and connection reuse, request and response framing (Content-Length, chunked,
close-delimited, HEAD, 204/304), early closes and the retry of idempotent requests,
backpressure in both directions, `Expect: 100-continue` and interim responses, keep-alive,
and malformed or oversized request heads.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools
import pytest

from sidecar.engines.base import Limits
from sidecar.engines.http1.downstream import DownstreamConn
from sidecar.engines.http1.router import Router
from sidecar.engines.http1.upstream import UpstreamConn
from sidecar.upstream.pool import UpstreamPool

# -- fakes ------------------------------------------------------------------------------


class FakeTransport:
    """One end of a connection, in memory: records writes, closes and read pauses.

    As with an asyncio transport, `close()` and `abort()` tell the protocol
    (`connection_lost`) on the next loop iteration; `lose()` is the peer going away.
    """

    def __init__(self, protocol: asyncio.Protocol, on_write: Callable[[bytes], None] | None = None):
        self.protocol = protocol
        self.on_write = on_write
        self.data = bytearray()
        self.closed = False
        self.aborted = False
        self.reading: list[str] = []  # "pause" / "resume", in the order they were asked for
        self.written_after_close = bytearray()
        self._lost = False
        protocol.connection_made(self)

    @property
    def paused(self) -> bool:
        return bool(self.reading) and self.reading[-1] == "pause"

    def write(self, data: bytes) -> None:
        if self.closed:
            self.written_after_close += data
            return
        self.data += data
        if self.on_write is not None:
            self.on_write(bytes(data))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.lose)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def lose(self) -> None:
        """The connection is gone (closed by either end): the protocol hears it once."""
        self.closed = True
        if not self._lost:
            self._lost = True
            self.protocol.connection_lost(None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading.append("pause")

    def resume_reading(self) -> None:
        self.reading.append("resume")

    def get_extra_info(self, name, default=None):
        return default

    # what a byte pipe (engines/tcp/pipe) needs of a transport
    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.Protocol:
        return self.protocol

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16384, 65536)

    def can_write_eof(self) -> bool:
        return False


@dataclass
class Message:
    """A request or response as an independent parser read it."""

    method: bytes = b""
    target: bytes = b""
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name]
        assert len(values) <= 1, f"{name!r} sent {len(values)} times"
        return values[0] if values else None


class Reader:
    """Reads the messages in one direction of a connection with its own llhttp parser."""

    def __init__(self, response: bool, on_complete: Callable[[Message], None] | None = None):
        self.messages: list[Message] = []
        self.error: Exception | None = None
        self.on_complete = on_complete
        self.parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(
            self
        )

    def feed(self, data: bytes) -> None:
        if self.error is None:
            try:
                self.parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
                self.error = e

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if isinstance(self.parser, httptools.HttpResponseParser):
            self.messages[-1].status = self.parser.get_status_code()
        else:
            self.messages[-1].method = self.parser.get_method()

    def on_body(self, chunk: bytes) -> None:
        self.messages[-1].body += chunk

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True
        if self.on_complete is not None:
            self.on_complete(self.messages[-1])


def responses(data: bytes) -> list[Message]:
    """The responses in what the client received; fails if it is not well-formed HTTP/1.1.
    (Not for answers to HEAD: a parser that did not see the request cannot know they have
    no body.)"""
    reader = Reader(response=True)
    reader.feed(data)
    assert reader.error is None, f"the client got malformed HTTP ({reader.error}): {data!r}"
    return reader.messages


def error_json(message: Message) -> dict:
    """The body of one of the sidecar's own error responses."""
    assert message.header(b"content-type") == b"application/json"
    body = json.loads(message.body)
    assert isinstance(body["error"], str)
    return body


Answer = Callable[["AppConn", Message], bytes | None]


def echo(conn: AppConn, req: Message) -> bytes:
    """The default app: 200 with the request target as the body."""
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(req.target), req.target)


class App:
    """The app behind the sidecar: accepts connections, reads requests, answers them.

    `answer(conn, request)` runs on the loop once a request is complete; it returns the
    bytes to send back, or None to answer by hand (`AppConn.send`, `AppConn.hang_up`).
    With `gate`, a new connection is not ready until the event is set.
    """

    def __init__(self, answer: Answer | None = echo, gate: asyncio.Event | None = None):
        self.answer = answer
        self.gate = gate
        self.conns: list[AppConn] = []

    async def connect(self, pool: UpstreamPool, host: str, port: int) -> UpstreamConn:
        if self.gate is not None:
            await self.gate.wait()
        up = UpstreamConn(pool)
        self.conns.append(AppConn(self, up))
        return up

    @property
    def requests(self) -> list[Message]:
        """Every request the app received, on any connection."""
        return [r for c in self.conns for r in c.requests]


class AppConn:
    """One connection as the app sees it."""

    def __init__(self, app: App, up: UpstreamConn):
        self.app = app
        self.up = up
        self.reader = Reader(response=False, on_complete=self._received)
        self.transport = FakeTransport(up, on_write=self.reader.feed)

    @property
    def requests(self) -> list[Message]:
        assert self.reader.error is None, f"the app got malformed HTTP: {self.transport.data!r}"
        return self.reader.messages

    def _received(self, req: Message) -> None:
        if self.app.answer is not None:
            asyncio.get_running_loop().call_soon(self._answer, req)

    def _answer(self, req: Message) -> None:
        if not self.transport.closed and self.app.answer is not None:
            data = self.app.answer(self, req)
            if data:
                self.send(data)

    def send(self, data: bytes) -> None:
        """The app writes `data` (it arrives at the sidecar in one read)."""
        self.up.data_received(data)

    def hang_up(self) -> None:
        """The app closes the connection."""
        if not self.transport.closed:
            self.up.eof_received()
            self.transport.lose()


# Not forwarded by the test router: it writes its own Host, and the engine frames the body.
NOT_FORWARDED = {b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}


class AppRouter(Router):
    """Sends every request to the app's pool with the client's end-to-end headers."""

    direction = "test"

    def __init__(self, pool: UpstreamPool):
        self.pool = pool

    def route(self, conn, ex):
        head = b"%s %s HTTP/1.1\r\nhost: app\r\n" % (ex.method, ex.target)
        for k, v in ex.headers:
            if k.lower() not in NOT_FORWARDED:
                head += b"%s: %s\r\n" % (k, v)
        return self.pool, head


class Proxy:
    """One client connection to the sidecar, with `app` behind it."""

    def __init__(self, app: App, limits: Limits | None = None):
        self.app = app
        self.pool = UpstreamPool("app", [("127.0.0.1", 8080)], app.connect, connect_timeout=5.0)
        self.conn = DownstreamConn(AppRouter(self.pool), limits or Limits(), None)
        self.client = FakeTransport(self.conn)

    def send(self, data: bytes) -> None:
        """The client's bytes arrive in one read."""
        self.conn.data_received(data)

    def responses(self) -> list[Message]:
        return responses(bytes(self.client.data))

    async def close(self) -> None:
        """The client goes away, then the app: no connection or timer is left behind."""
        self.client.lose()
        for conn in self.app.conns:
            conn.hang_up()
        await settle()
        for t in [self.client] + [c.transport for c in self.app.conns]:
            assert not t.written_after_close, bytes(t.written_after_close)


async def settle() -> None:
    """Let scheduled callbacks and tasks (connects, the app's answers) run."""
    for _ in range(10):
        await asyncio.sleep(0)


def in_loop(test):
    """Run an async test in a fresh event loop."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))

    return run


def request(method: bytes, target: bytes, *headers: bytes, version: bytes = b"1.1") -> bytes:
    """A request head (the body, if any, is sent after it)."""
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"%s %s HTTP/%s\r\nhost: sidecar\r\n%s\r\n" % (method, target, version, lines)


def get(target: bytes, *headers: bytes, version: bytes = b"1.1") -> bytes:
    return request(b"GET", target, *headers, version=version)


# -- 1. pipelining and connection reuse --------------------------------------------------


@in_loop
async def test_second_pipelined_request_waits_for_the_first_response():
    """Two requests in one packet: the app gets the second only once it has fully answered
    the first, both on one connection, and the client gets the answers in order."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/first") + get(b"/second"))
    await settle()
    assert [r.target for r in app.requests] == [b"/first"]

    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfir")
    await settle()
    assert [r.target for r in app.requests] == [b"/first"], "sent before the answer ended"

    app.conns[0].send(b"st")
    await settle()
    assert [r.target for r in app.requests] == [b"/first", b"/second"]
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond")
    await settle()

    assert [(r.status, bytes(r.body)) for r in proxy.responses()] == [
        (200, b"first"),
        (200, b"second"),
    ]
    assert len(app.conns) == 1
    await proxy.close()


@in_loop
async def test_three_pipelined_requests_are_answered_in_order_on_one_connection():
    """Three requests in one packet, then a fourth later: four answers in order, and the
    app sees one connection (kept alive and reused)."""
    app = App()
    proxy = Proxy(app)
    proxy.send(get(b"/a") + get(b"/b?x=1") + get(b"/c"))
    await settle()
    proxy.send(get(b"/d"))
    await settle()

    got = proxy.responses()
    assert [bytes(r.body) for r in got] == [b"/a", b"/b?x=1", b"/c", b"/d"]
    assert all(r.complete and r.status == 200 for r in got)
    assert len(app.conns) == 1
    assert not proxy.client.closed
    await proxy.close()


@in_loop
@pytest.mark.parametrize("queued", [False, True])
async def test_request_trailers_never_become_headers(queued):
    """A chunked request's trailers are dropped, also when the request is routed only after
    they were parsed (queued behind another one): none reaches the app as a header."""
    app = App()
    proxy = Proxy(app)
    second = (
        b"POST /second HTTP/1.1\r\nhost: sidecar\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nx-smuggled: from-a-trailer\r\nhost: evil.example\r\n\r\n"
    )
    proxy.send((get(b"/first") if queued else b"") + second)
    for _ in range(5):
        await settle()
    (req,) = [m for m in app.requests if m.target == b"/second"]
    assert bytes(req.body) == b"hi"
    assert req.header(b"x-smuggled") is None
    hosts = [v for k, v in req.headers if k.lower() == b"host"]
    assert len(hosts) == 1 and b"evil.example" not in hosts
    await proxy.close()


@in_loop
async def test_client_is_not_read_while_a_pipelined_request_waits():
    """While a pipelined request waits for its turn, the sidecar reads nothing more from
    that client (else a client pipelining small requests queues them without bound)."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/first") + get(b"/second"))
    await settle()
    assert [r.target for r in app.requests] == [b"/first"]  # /second is queued
    assert proxy.client.paused
    await proxy.close()


# -- 2. request bodies --------------------------------------------------------------------


@in_loop
async def test_chunked_request_body_split_anywhere_arrives_rechunked_and_complete():
    """A chunked upload cut inside a chunk-size line, inside chunk data and inside the last
    chunk reaches the app chunked, byte-exact and terminated."""
    app = App()
    proxy = Proxy(app)
    head = request(b"POST", b"/upload", b"Transfer-Encoding: chunked")
    # 5 bytes, then 0x10 bytes, then the last chunk; the cuts fall in "1|0", the data, "\r|\n"
    pieces = [head + b"5\r\nhel", b"lo\r\n1", b"0\r\n0123456789", b"abcdef\r\n0\r", b"\n\r\n"]
    for piece in pieces:
        proxy.send(piece)
        await settle()

    (req,) = app.requests
    assert req.method == b"POST" and req.complete
    assert req.header(b"transfer-encoding") == b"chunked"
    assert req.header(b"content-length") is None
    assert bytes(req.body) == b"hello0123456789abcdef"
    assert app.conns[0].transport.data.endswith(b"\r\n0\r\n\r\n")
    assert [r.status for r in proxy.responses()] == [200]
    await proxy.close()


@in_loop
async def test_content_length_request_body_split_arrives_byte_exact():
    """A Content-Length upload in three reads reaches the app with the same length and
    exactly the bytes sent, nothing after them."""
    app = App()
    proxy = Proxy(app)
    for piece in [request(b"PUT", b"/doc", b"Content-Length: 11") + b"hel", b"lo w", b"orld"]:
        proxy.send(piece)
        await settle()

    (req,) = app.requests
    assert req.complete and req.header(b"content-length") == b"11"
    assert req.header(b"transfer-encoding") is None
    assert bytes(req.body) == b"hello world"
    assert app.conns[0].transport.data.endswith(b"\r\n\r\nhello world")
    assert [r.status for r in proxy.responses()] == [200]
    await proxy.close()


# -- 3. response framing ------------------------------------------------------------------


@in_loop
async def test_content_length_response_is_passed_through():
    """A response with Content-Length reaches the client with the same length and body."""
    app = App(answer=lambda c, r: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nx-app: 1\r\n\r\nhello")
    proxy = Proxy(app)
    proxy.send(get(b"/"))
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 200 and resp.complete
    assert resp.header(b"content-length") == b"5"
    assert resp.header(b"transfer-encoding") is None
    assert resp.header(b"x-app") == b"1"
    assert bytes(resp.body) == b"hello"
    await proxy.close()


@in_loop
async def test_chunked_response_is_rechunked():
    """A chunked response arriving in pieces reaches the client chunked, whole, and
    terminated, so the client can send its next request on the same connection."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/"))
    await settle()
    app.conns[0].send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
    app.conns[0].send(b"c\r\n2\r\nde\r\n0\r\n\r\n")
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 200 and resp.complete
    assert resp.header(b"transfer-encoding") == b"chunked"
    assert resp.header(b"content-length") is None
    assert bytes(resp.body) == b"abcde"
    assert proxy.client.data.endswith(b"\r\n0\r\n\r\n")
    assert not proxy.client.closed
    await proxy.close()


@in_loop
async def test_close_delimited_response_is_chunked_for_an_http11_client():
    """An app response with no length, ended by the app closing, reaches an HTTP/1.1
    client chunked and complete; the client's connection stays open and serves the next
    request (on a new app connection)."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/stream"))
    await settle()
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nabc")
    app.conns[0].send(b"def")
    app.conns[0].hang_up()
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 200 and resp.complete
    assert resp.header(b"transfer-encoding") == b"chunked"
    assert bytes(resp.body) == b"abcdef"
    assert not proxy.client.closed

    app.answer = echo
    proxy.send(get(b"/next"))
    await settle()
    assert [bytes(r.body) for r in proxy.responses()] == [b"abcdef", b"/next"]
    assert len(app.conns) == 2
    await proxy.close()


@in_loop
async def test_close_delimited_response_to_an_http10_client_ends_with_close():
    """The same response to an HTTP/1.0 client (which cannot read chunked) is sent as is,
    with `connection: close`, and the connection is closed at its end even though the
    client asked for keep-alive."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/stream", b"Connection: keep-alive", version=b"1.0"))
    await settle()
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nabc")
    app.conns[0].send(b"def")
    assert not proxy.client.closed
    app.conns[0].hang_up()
    await settle()

    (resp,) = proxy.responses()  # complete only at the close, which the reader is not told
    assert resp.status == 200
    assert resp.header(b"transfer-encoding") is None
    assert resp.header(b"content-length") is None
    assert resp.header(b"connection") == b"close"
    assert bytes(resp.body) == b"abcdef"
    assert proxy.client.closed
    await proxy.close()


def answer_by_target(conn: AppConn, req: Message) -> bytes:
    if req.target == b"/204":
        return b"HTTP/1.1 204 No Content\r\nx-app: 1\r\n\r\n"
    if req.target == b"/304":
        return b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\ncontent-length: 5\r\n\r\n'
    return echo(conn, req)


@in_loop
async def test_204_and_304_responses_have_no_body():
    """204 and 304 reach the client with no body and no chunked framing, and the answer
    pipelined after them is intact."""
    app = App(answer=answer_by_target)
    proxy = Proxy(app)
    proxy.send(get(b"/204") + get(b"/304") + get(b"/after"))
    await settle()

    got = proxy.responses()
    assert [(r.status, bytes(r.body)) for r in got] == [(204, b""), (304, b""), (200, b"/after")]
    assert all(r.complete for r in got)
    assert got[0].header(b"transfer-encoding") is None
    assert got[1].header(b"transfer-encoding") is None
    assert got[1].header(b"etag") == b'"v1"'
    assert len(app.conns) == 1
    await proxy.close()


@in_loop
async def test_head_response_has_no_body_even_if_the_app_sends_one():
    """The app answers a HEAD with a body it should not send: the client gets the head
    only, and the GET pipelined after it gets its own answer, not the stray body."""

    def answer(conn, req):
        if req.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
        return echo(conn, req)

    app = App(answer=answer)
    proxy = Proxy(app)
    proxy.send(request(b"HEAD", b"/h") + get(b"/g"))
    await settle()

    data = bytes(proxy.client.data)
    end = data.index(b"\r\n\r\n") + 4
    head = Reader(response=True)
    head.feed(data[:end])
    assert head.messages[0].status == 200
    assert head.messages[0].header(b"content-length") == b"5"
    rest = responses(data[end:])
    assert [(r.status, bytes(r.body), r.complete) for r in rest] == [(200, b"/g", True)]
    assert b"hello" not in data
    await proxy.close()


# -- 4. early closes ------------------------------------------------------------------------


@in_loop
async def test_client_closing_mid_body_aborts_the_upstream_connection():
    """The client goes away halfway through an upload: the app's connection is aborted
    (never reused for another request with half a body on it)."""
    app = App()
    proxy = Proxy(app)
    proxy.send(request(b"POST", b"/upload", b"Content-Length: 10") + b"abc")
    await settle()
    (req,) = app.requests
    assert bytes(req.body) == b"abc" and not req.complete

    proxy.client.lose()
    await settle()
    assert app.conns[0].transport.aborted
    await proxy.close()


@in_loop
async def test_upstream_closing_before_answering_on_a_new_connection_gives_502():
    """The app closes a new connection without answering: the client gets a 502 with a
    JSON error, and its connection stays usable."""
    app = App(answer=lambda conn, req: conn.hang_up())
    proxy = Proxy(app)
    proxy.send(get(b"/"))
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 502 and resp.complete
    error_json(resp)
    assert len(app.conns) == 1, "a request on a new connection is not retried"
    assert not proxy.client.closed
    await proxy.close()


@in_loop
async def test_upstream_closing_mid_response_cuts_the_client_off():
    """The app closes before its Content-Length is reached: the client's connection is
    closed (so it sees a truncated response), and no second response is written after the
    partial one."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/"))
    await settle()
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    app.conns[0].hang_up()
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 200 and not resp.complete
    assert bytes(resp.body) == b"abc"
    assert proxy.client.data.count(b"HTTP/1.1 ") == 1
    assert proxy.client.closed
    await proxy.close()


def hang_up_on_second_request(conn: AppConn, req: Message) -> bytes | None:
    """An app that closed its first connection while it was idle: the close reaches the
    sidecar only after the next request went out on it."""
    if conn is conn.app.conns[0] and len(conn.requests) == 2:
        conn.hang_up()
        return None
    return echo(conn, req)


@in_loop
async def test_get_on_a_reused_connection_the_app_closed_is_retried_once():
    """A GET sent on a kept-alive connection that the app closes without a byte is sent
    again, once, on a new connection, and the client gets the answer."""
    app = App(answer=hang_up_on_second_request)
    proxy = Proxy(app)
    proxy.send(get(b"/one"))
    await settle()
    proxy.send(get(b"/two"))
    await settle()

    assert [(r.status, bytes(r.body)) for r in proxy.responses()] == [
        (200, b"/one"),
        (200, b"/two"),
    ]
    assert len(app.conns) == 2
    assert [r.target for r in app.conns[0].requests] == [b"/one", b"/two"]
    assert [r.target for r in app.conns[1].requests] == [b"/two"]
    await proxy.close()


@in_loop
async def test_post_on_a_reused_connection_the_app_closed_is_not_retried():
    """A POST with a body in the same situation is not sent again (the app may have acted
    on it): the client gets a 502 and the app saw the POST once."""
    app = App(answer=hang_up_on_second_request)
    proxy = Proxy(app)
    proxy.send(get(b"/one"))
    await settle()
    proxy.send(request(b"POST", b"/pay", b"Content-Length: 4") + b"10EU")
    await settle()

    got = proxy.responses()
    assert [r.status for r in got] == [200, 502]
    error_json(got[1])
    assert [r.method for r in app.requests if r.method == b"POST"] == [b"POST"]
    assert len(app.conns) == 1
    await proxy.close()


# -- 5. backpressure --------------------------------------------------------------------------


@in_loop
async def test_slow_client_pauses_reading_from_the_app():
    """When the client's transport is full (pause_writing), the sidecar stops reading the
    app's response; when it drains (resume_writing), reading resumes."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/download"))
    await settle()
    app_transport = app.conns[0].transport
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabc")

    proxy.conn.pause_writing()
    assert app_transport.reading == ["pause"]
    proxy.conn.resume_writing()
    assert app_transport.reading == ["pause", "resume"]

    app.conns[0].send(b"def")
    await settle()
    (resp,) = proxy.responses()
    assert resp.complete and bytes(resp.body) == b"abcdef"
    await proxy.close()


@in_loop
async def test_slow_app_pauses_reading_from_the_client():
    """When the app's transport is full (pause_writing), the sidecar stops reading the
    client's upload; when it drains, reading resumes and the upload completes."""
    app = App()
    proxy = Proxy(app)
    proxy.send(request(b"POST", b"/upload", b"Content-Length: 6") + b"abc")
    await settle()
    up = app.conns[0].up

    up.pause_writing()
    assert proxy.client.paused
    up.resume_writing()
    assert not proxy.client.paused
    assert proxy.client.reading == ["pause", "resume"]

    proxy.send(b"def")
    await settle()
    (req,) = app.requests
    assert req.complete and bytes(req.body) == b"abcdef"
    assert [r.status for r in proxy.responses()] == [200]
    await proxy.close()


@in_loop
async def test_large_body_before_the_upstream_is_ready_pauses_the_client():
    """While the app's connection is not yet up, the sidecar buffers at most about 1 MiB
    of upload, then stops reading the client; once the connection is up and the buffer
    is flushed to the app, reading resumes and the upload arrives byte-exact."""
    gate = asyncio.Event()
    app = App(gate=gate)
    proxy = Proxy(app)
    piece = 64 * 1024
    body = bytes(range(256)) * (24 * piece // 256)  # 1.5 MiB
    proxy.send(request(b"POST", b"/upload", b"Content-Length: %d" % len(body)))
    sent = 0
    while not proxy.client.paused and sent < len(body):
        proxy.send(body[sent : sent + piece])
        sent += piece
        await settle()
    assert proxy.client.paused
    assert (1 << 20) < sent <= (1 << 20) + piece, sent
    assert app.conns == []

    gate.set()
    await settle()
    assert not proxy.client.paused
    (req,) = app.requests
    assert len(req.body) == sent and not req.complete

    proxy.send(body[sent:])
    await settle()
    assert req.complete and bytes(req.body) == body
    assert [r.status for r in proxy.responses()] == [200]
    await proxy.close()


@in_loop
async def test_client_still_full_when_its_next_request_starts_keeps_the_app_paused():
    """A client whose transport became full at the end of one answer and sends its next
    request before draining: the app's next response is not read until the client
    drains (else it is buffered without bound)."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/one"))
    await settle()
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none")
    proxy.conn.pause_writing()  # the last write of /one filled the client's buffer
    await settle()

    proxy.send(get(b"/two"))
    await settle()
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabc")
    assert app.conns[0].transport.paused
    proxy.conn.resume_writing()
    assert not app.conns[0].transport.paused
    await proxy.close()


# -- 6. Expect and interim responses ------------------------------------------------------------


@in_loop
async def test_expect_100_continue_is_answered_and_not_forwarded():
    """A client that sends `Expect: 100-continue` gets `100 Continue` before it sends the
    body; the app never sees the Expect header, and gets the whole body."""
    app = App()
    proxy = Proxy(app)
    proxy.send(request(b"POST", b"/upload", b"Expect: 100-continue", b"Content-Length: 4"))
    assert bytes(proxy.client.data) == b"HTTP/1.1 100 Continue\r\n\r\n"
    await settle()
    proxy.send(b"data")
    await settle()

    (req,) = app.requests
    assert req.header(b"expect") is None
    assert req.complete and bytes(req.body) == b"data"
    assert [r.status for r in proxy.responses()] == [100, 200]
    await proxy.close()


@in_loop
async def test_interim_responses_from_the_app_are_not_forwarded():
    """The app sends 100 Continue and 103 Early Hints before its 200: the client gets the
    200 only, with none of the interim responses' headers."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/"))
    await settle()
    app.conns[0].send(b"HTTP/1.1 100 Continue\r\n\r\n")
    app.conns[0].send(
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    )
    await settle()

    (resp,) = proxy.responses()
    assert (resp.status, bytes(resp.body), resp.complete) == (200, b"ok", True)
    assert resp.header(b"link") is None
    assert b"Continue" not in proxy.client.data and b"103" not in proxy.client.data
    await proxy.close()


@in_loop
async def test_expect_of_a_pipelined_request_does_not_corrupt_the_response_in_progress():
    """A client downloading a file sends its next request (with `Expect: 100-continue`)
    before the download ends: the download's bytes reach it intact."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/download"))
    await settle()
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabc")
    proxy.send(request(b"POST", b"/upload", b"Expect: 100-continue", b"Content-Length: 4"))
    app.conns[0].send(b"def")
    await settle()
    proxy.send(b"data")
    await settle()
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await settle()

    finals = [bytes(r.body) for r in proxy.responses() if r.status >= 200]
    assert finals == [b"abcdef", b"ok"]
    await proxy.close()


@in_loop
async def test_expect_100_continue_from_an_http10_client_is_ignored():
    """An HTTP/1.0 client, which knows no interim responses, gets only the final answer."""
    app = App()
    proxy = Proxy(app)
    proxy.send(
        request(b"POST", b"/upload", b"Expect: 100-continue", b"Content-Length: 4", version=b"1.0")
        + b"data"
    )
    await settle()
    assert proxy.client.data.startswith(b"HTTP/1.1 200 ")
    await proxy.close()


# -- 7. keep-alive ------------------------------------------------------------------------------


@in_loop
async def test_http10_client_without_keep_alive_is_closed_after_the_answer():
    """An HTTP/1.0 request without keep-alive gets `connection: close` and the connection
    is closed once the answer is sent."""
    app = App()
    proxy = Proxy(app)
    proxy.send(get(b"/", version=b"1.0"))
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 200 and bytes(resp.body) == b"/"
    assert resp.header(b"connection") == b"close"
    assert proxy.client.closed
    await proxy.close()


@in_loop
async def test_http10_client_with_keep_alive_stays_open():
    """An HTTP/1.0 request with `Connection: keep-alive` is told `connection: keep-alive`
    (an HTTP/1.0 client closes otherwise) and the connection stays open."""
    app = App()
    proxy = Proxy(app)
    proxy.send(get(b"/", b"Connection: keep-alive", version=b"1.0"))
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 200 and resp.header(b"connection") == b"keep-alive"
    assert not proxy.client.closed
    await proxy.close()


@in_loop
async def test_http11_client_stays_open():
    """An HTTP/1.1 client's connection stays open after each answer, with no
    `connection: close`, and carries its next request."""
    app = App()
    proxy = Proxy(app)
    proxy.send(get(b"/one"))
    await settle()
    assert not proxy.client.closed
    proxy.send(get(b"/two"))
    await settle()

    got = proxy.responses()
    assert [bytes(r.body) for r in got] == [b"/one", b"/two"]
    assert all(r.header(b"connection") is None for r in got)
    assert not proxy.client.closed
    await proxy.close()


@in_loop
async def test_connection_close_from_the_client_closes_after_the_answer():
    """An HTTP/1.1 request with `Connection: close` is answered with `connection: close`
    and the connection is closed after the answer."""
    app = App()
    proxy = Proxy(app)
    proxy.send(get(b"/", b"Connection: close"))
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 200 and resp.complete
    assert resp.header(b"connection") == b"close"
    assert proxy.client.closed
    await proxy.close()


# -- 8. malformed input ------------------------------------------------------------------------


@in_loop
async def test_garbage_gets_400_and_close_and_nothing_goes_upstream():
    """Bytes that are not HTTP (here a TLS ClientHello) get a 400 JSON error with
    `connection: close`, the connection is closed, and the app is never contacted."""
    app = App()
    proxy = Proxy(app)
    proxy.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32)
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 400
    error_json(resp)
    assert resp.header(b"connection") == b"close"
    assert proxy.client.closed
    assert app.conns == []
    await proxy.close()


@in_loop
async def test_head_over_the_limit_gets_431():
    """A request head larger than `max_header_bytes` gets 431 with `connection: close`, and
    the app is never contacted."""
    app = App()
    proxy = Proxy(app, Limits(max_header_bytes=1024))
    proxy.send(get(b"/", b"x-big: " + b"a" * 2000))
    await settle()

    (resp,) = proxy.responses()
    assert resp.status == 431
    error_json(resp)
    assert resp.header(b"connection") == b"close"
    assert proxy.client.closed
    assert app.conns == []
    await proxy.close()


@in_loop
async def test_header_line_still_arriving_is_refused_once_over_the_limit():
    """A client streaming one endless header line is refused with 431 once the head passes
    `max_header_bytes`, not buffered until the line ends."""
    app = App()
    proxy = Proxy(app, Limits(max_header_bytes=4096))
    proxy.send(b"GET / HTTP/1.1\r\nhost: sidecar\r\nx-big: ")
    for _ in range(16):  # 64 KiB, 16 times the limit, and no end of line
        if proxy.client.closed:
            break
        proxy.send(b"a" * 4096)
    await settle()
    assert proxy.client.data.startswith(b"HTTP/1.1 431 ")
    assert proxy.client.closed
    await proxy.close()


@in_loop
async def test_upload_flushed_into_a_full_app_buffer_keeps_the_client_paused(monkeypatch):
    """The app's connection comes up while 1 MiB of upload waits; flushing it fills the
    app transport's buffer (pause_writing): the sidecar does not read more of the client
    until the app drains (else a 50 MiB upload piles up in memory)."""
    gate = asyncio.Event()
    app = App(answer=None, gate=gate)
    proxy = Proxy(app)
    size = 50 * 1024 * 1024
    proxy.send(request(b"POST", b"/upload", b"Content-Length: %d" % size))
    piece = b"x" * 65536
    sent = 0
    while not proxy.client.paused:
        proxy.send(piece)
        sent += len(piece)
    write = FakeTransport.write
    buffered = {"n": 0, "full": False}

    def slow_reader(self, data):  # an app transport over its high-water mark at 64 KiB
        write(self, data)
        if self is not proxy.client:
            buffered["n"] += len(data)
            if buffered["n"] > 65536 and not buffered["full"]:
                buffered["full"] = True
                self.protocol.pause_writing()

    monkeypatch.setattr(FakeTransport, "write", slow_reader)
    gate.set()
    await settle()
    assert buffered["full"] and proxy.client.paused
    app.conns[0].transport.protocol.resume_writing()  # the app drained its buffer
    assert not proxy.client.paused
    await proxy.close()


@in_loop
async def test_a_flood_of_pipelined_requests_is_bounded():
    """Thousands of pipelined requests in one read: at most 32 wait behind the one in flight
    (not the whole read); past that the client gets 400 and the connection closes."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(get(b"/x") * 2000)
    await settle()
    assert len(proxy.conn.queue) <= 32
    (resp,) = proxy.responses()
    assert resp.status == 400 and error_json(resp)["detail"] == "too many pipelined requests"
    assert proxy.client.closed
    await proxy.close()


@in_loop
async def test_a_client_hanging_up_is_recorded_and_not_blamed_on_the_app():
    """The client goes away before the app answers: the app connection is dropped, the
    endpoint is not counted as failing (outlier detection would eject a healthy app), and
    the exchange is still recorded, with `client_disconnected`."""
    app = App(answer=None)
    proxy = Proxy(app)
    records = []

    class Recorder:
        def write(self, rec):
            records.append(rec)

    proxy.conn.access_log = Recorder()
    proxy.send(get(b"/slow"))
    await settle()
    assert [r.target for r in app.requests] == [b"/slow"]
    proxy.client.lose()
    await settle()
    assert app.conns[0].transport.aborted
    (endpoint,) = proxy.pool.endpoints
    assert endpoint.failures == 0 and endpoint.active == 0 and proxy.pool.active_requests == 0
    (rec,) = records
    assert (rec.path, rec.status, rec.error) == ("/slow", 0, "client_disconnected")
    await proxy.close()


@in_loop
async def test_the_whole_request_timeout_covers_a_stalled_body():
    """A service `timeout` is for the whole request: an app that sends its head and part of
    the body, then stalls, is cut off when the time is up (the client's connection closes
    and the request's place in the pool is given back)."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.pool.timeout = 0.5
    proxy.send(get(b"/stall"))
    await settle()
    app.conns[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
    await settle()
    assert proxy.pool.active_requests == 1 and not proxy.client.closed
    await asyncio.sleep(1.0)  # the deadline sweep runs every 0.25 s
    assert proxy.client.closed and proxy.pool.active_requests == 0
    await proxy.close()


@in_loop
async def test_the_whole_request_timeout_starts_after_an_injected_delay():
    """The request's time starts with its first try, after a route's injected delay (as in
    Envoy): a 0.6 s delay on a 0.5 s timeout still reaches the app and is answered."""
    app = App()

    class Delaying(AppRouter):
        def route(self, conn, ex):
            ex.delay = 0.6
            return super().route(conn, ex)

    proxy = Proxy(app)
    proxy.conn.router = Delaying(proxy.pool)
    proxy.pool.timeout = 0.5
    proxy.send(get(b"/late"))
    await asyncio.sleep(1.0)
    assert [r.status for r in proxy.responses()] == [200]
    assert [r.target for r in app.requests] == [b"/late"]
    await proxy.close()


# -- upgrades and tunnels ----------------------------------------------------------------

WS_UPGRADE = get(b"/ws", b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Key: k")


@in_loop
async def test_a_websocket_upgrade_becomes_a_byte_pipe_in_order():
    """Early client bytes wait for the 101; bytes the app sends right after its 101 head (in
    the same read) reach the client after the head; then both directions are a pipe."""
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(WS_UPGRADE + b"EARLY-FRAME")
    await settle()
    up = app.conns[0].transport
    head, _, rest = bytes(up.data).partition(b"\r\n\r\n")
    assert head.startswith(b"GET /ws HTTP/1.1") and rest == b"", "early bytes went before a 101"
    lines = head.lower().split(b"\r\n")
    assert b"connection: upgrade" in lines and b"upgrade: websocket" in lines
    app.conns[0].send(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: a\r\n\r\nSERVER-FRAME"
    )
    await settle()
    got = bytes(proxy.client.data)
    assert got.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and got.endswith(
        b"\r\n\r\nSERVER-FRAME"
    ), got
    assert b"sec-websocket-accept: a" in got.lower()
    assert bytes(up.data).endswith(b"\r\n\r\nEARLY-FRAME")
    proxy.client.protocol.data_received(b"MORE")  # the pipe owns both transports now
    up.protocol.data_received(b"BACK")
    assert bytes(up.data).endswith(b"EARLY-FRAMEMORE")
    assert bytes(proxy.client.data).endswith(b"SERVER-FRAMEBACK")
    up.lose()  # the app closes: so does the client's side
    await settle()
    assert proxy.client.closed


@in_loop
async def test_a_refused_upgrade_is_answered_and_closes_without_passing_early_bytes():
    app = App(answer=None)
    proxy = Proxy(app)
    proxy.send(WS_UPGRADE + b"EARLY")
    await settle()
    app.conns[0].send(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
    await settle()
    [answer] = proxy.responses()
    assert answer.status == 403 and bytes(answer.body) == b"no"
    assert proxy.client.closed
    assert b"EARLY" not in bytes(app.conns[0].transport.data)


@in_loop
async def test_connect_hands_the_connection_over_with_the_bytes_after_its_head():
    class Catcher(asyncio.Protocol):
        def __init__(self):
            self.transport = None
            self.data = b""

        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.data += data

    caught = Catcher()

    class TunnelRouter(AppRouter):
        def tunnel(self, conn, ex):
            assert ex.target == b"db.default:5432"
            return lambda: caught

    app = App()
    pool = UpstreamPool("app", [("127.0.0.1", 8080)], app.connect)
    conn = DownstreamConn(TunnelRouter(pool), Limits(), None)
    client = FakeTransport(conn)
    conn.data_received(b"CONNECT db.default:5432 HTTP/1.1\r\nHost: db.default:5432\r\n\r\nHELLO")
    await settle()
    assert caught.transport is client and client.protocol is caught and caught.data == b"HELLO"
    assert client.data == b"" and not client.closed  # the new owner answers the CONNECT
    assert app.conns == []


@pytest.mark.parametrize(
    "head",
    [
        get(b"/a", b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c", b"Content-Length: 31"),
        get(b"/ws", b"Connection: Upgrade", b"Upgrade: websocket", b"Content-Length: 5"),
        get(b"/ws", b"Connection: Upgrade", b"Upgrade: websocket", b"Transfer-Encoding: chunked"),
        b"CONNECT db:1 HTTP/1.1\r\nHost: db:1\r\nContent-Length: 4\r\n\r\n",
    ],
)
@in_loop
async def test_an_upgrade_request_with_a_body_is_refused_before_anything_is_sent(head):
    """llhttp skips the body of an upgrade request: forwarded with its length, the next
    request (never authorized) would be what the app reads as that body. 400 and close."""
    app = App()
    proxy = Proxy(app)
    proxy.send(head + b"GET /private/secret HTTP/1.1\r\nHost: a\r\n\r\n")
    await settle()
    [answer] = proxy.responses()
    assert answer.status == 400 and proxy.client.closed
    assert app.requests == [] and app.conns == []


@in_loop
async def test_reading_stays_paused_while_an_upgrade_waits_for_its_101():
    """A new upstream connection (dialled after the head) must not resume reading the
    client: what the client sends before the 101 is the new protocol's."""
    gate = asyncio.Event()
    app = App(answer=None, gate=gate)
    proxy = Proxy(app)
    proxy.send(WS_UPGRADE + b"EARLY")
    await settle()
    assert proxy.client.paused
    gate.set()
    await settle()
    assert app.conns and proxy.client.paused, proxy.client.reading
