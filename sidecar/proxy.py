"""The HTTP/1.1 forwarding engine shared by the inbound and outbound listeners.

Protocol-level and streaming: httptools (llhttp) parses each message head in
one C call, header rewrites work on bytes, bodies are forwarded chunk by chunk
with flow control in both directions (a 1 GiB upload is never held in memory),
and upstream connections are kept alive in a pool. What differs between inbound
and outbound (who may connect, where a request goes, which headers change)
lives in a `Router`; this module only moves bytes and frames messages.

Framing rules: a request body keeps its Content-Length or is re-chunked; both
or conflicting lengths are refused by llhttp (400). The only transfer coding
accepted is `chunked`, alone, in HTTP/1.1 (`check_transfer_encoding`); only
HTTP/1.0 and HTTP/1.1 request lines are accepted (`check_version`). Both are
checked when the head is complete, before the router runs, so a refused request
never sends a byte upstream. `Expect: 100-continue` is
answered here, as Envoy does, and not forwarded. Hop-by-hop headers (RFC 9110
section 7.6.1, and any named in Connection) are removed in both directions.
Trailers are dropped. Upgrades (WebSocket, h2c) are not offered: the request is
forwarded as plain HTTP/1.1 without its upgrade headers.
"""

from __future__ import annotations

import asyncio
import collections
import json
import json.encoder
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httptools

log = logging.getLogger("sidecar.proxy")

# Methods a proxy may send again on its own when a reused connection dies before an answer
# (RFC 9110 9.2.2); POST, PATCH and the rest reach the app at most once.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
FRAMING = frozenset({b"content-length", b"transfer-encoding"})
BODYLESS_STATUS = frozenset({204, 304})
HIGH_WATER = 256 * 1024  # pause the other side when this much is buffered for a transport
PENDING_LIMIT = 1 << 20  # body bytes buffered before an upstream connection is ready

Headers = list[tuple[bytes, bytes]]


SWEEP_INTERVAL = 0.25  # seconds; deadlines are checked this often


class Deadlines:
    """One periodic sweep checks every connection's deadline.

    Setting a deadline is an attribute write, so timeouts cost nothing per
    request; a timer per request (arm, cancel, re-arm) cost more than the
    header rewrite. Resolution is SWEEP_INTERVAL.
    """

    def __init__(self) -> None:
        self.members: set[Any] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, conn: Any) -> None:
        """Watch `conn` (it has `deadline` and `on_deadline`)."""
        self.members.add(conn)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def discard(self, conn: Any) -> None:
        """Stop watching `conn`."""
        self.members.discard(conn)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.members):
            fn = conn.on_deadline
            if fn is not None and now >= conn.deadline:
                conn.on_deadline = None
                try:
                    fn()
                except Exception:  # a sweep must never die
                    log.exception("deadline handler failed")
        self._handle = loop.call_later(SWEEP_INTERVAL, self._sweep) if self.members else None


DEADLINES = Deadlines()


class ProxyError(Exception):
    """A request the proxy answers itself: status, JSON error code, detail for the peer."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        close: bool = False,
        headers: Sequence[tuple[bytes, bytes]] = (),
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.close = status, code, detail, close
        self.headers = headers
        self.extra = extra or {}


class RouteLater(Exception):  # noqa: N818 (a signal, not an error)
    """The router needs to await something (a JWKS refresh) before it can decide.

    The request is held (nothing is sent upstream), `wait()` is awaited, then
    routing runs once more with `Exchange.rerouted` set.
    """

    def __init__(self, wait: Callable[[], Awaitable[Any]]) -> None:
        super().__init__("route later")
        self.wait = wait


_REASONS = {
    100: "Continue",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

# RFC 9110 5.6.2: tchar. A transfer coding is a token (parameters are not accepted).
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_version(version: str) -> None:
    """Refuse anything but HTTP/1.0 and HTTP/1.1 (ProxyError 400 or 505).

    llhttp also lets through a request line without a version (HTTP/0.9, which
    has no headers and no framing; llhttp reports `HTTP/0.9` the same way: both
    get 400) and `HTTP/2.0` (a version an HTTP/1 request line cannot carry: 505);
    it refuses `HTTP/1.2`, `http/1.1` and the like itself (400).
    """
    if version == "1.1" or version == "1.0":
        return
    if version == "0.9":
        raise ProxyError(
            400,
            "bad_request",
            "HTTP/0.9 is not served (no HTTP/1.x version in the request line)",
            True,
        )
    raise ProxyError(
        505, "http_version_not_supported", f"HTTP/{version} is not supported: use HTTP/1.1", True
    )


def check_transfer_encoding(value: bytes, version: str) -> None:
    """Accept `Transfer-Encoding: chunked` (alone, HTTP/1.1) only; else ProxyError 400 or 501.

    400: in an HTTP/1.0 request (RFC 9112 6.1: the framing is faulty), an empty
    or malformed list, or `chunked` anywhere but once at the end (RFC 9112 6.3:
    the body length cannot be determined). 501: any other coding (`xchunked`,
    `gzip`, `gzip, chunked`: RFC 9112 6.1, and what Envoy answers): the sidecar
    does not decode codings, and re-chunking would silently drop them.
    """
    coding = value.strip(b" \t").lower()
    if coding == b"chunked" and version == "1.1":
        return
    if version != "1.1":
        raise ProxyError(
            400, "bad_transfer_encoding", "Transfer-Encoding in an HTTP/1.0 request", True
        )
    codings = [c.strip(b" \t") for c in coding.split(b",")]
    if not all(c and _TCHAR.issuperset(c) for c in codings):
        raise ProxyError(400, "bad_transfer_encoding", "malformed Transfer-Encoding", True)
    if b"chunked" in codings[:-1]:
        raise ProxyError(
            400, "bad_transfer_encoding", "chunked must be the final transfer coding, once", True
        )
    unknown = ", ".join(c.decode("ascii") for c in codings if c != b"chunked")
    raise ProxyError(
        501, "unsupported_transfer_encoding", f"transfer coding not supported: {unknown}", True
    )


def error_bytes(
    status: int,
    code: str,
    detail: str,
    close: bool,
    extra: Sequence[tuple[bytes, bytes]] = (),
    fields: dict[str, str] | None = None,
    head_only: bool = False,
) -> bytes:
    """A complete JSON error response (`fields` add keys to the JSON body); with
    `head_only` (the answer to a HEAD) the same head and no body."""
    body = json.dumps({"error": code, "detail": detail, **(fields or {})}).encode() + b"\n"
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Error").encode()),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
    ]
    lines += [b"%s: %s\r\n" % (k, v) for k, v in extra]
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines) + (b"" if head_only else body)


def connection_tokens(headers: Headers) -> set[bytes]:
    """Header names listed in Connection (they are hop-by-hop too)."""
    names: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            names.update(t.strip().lower() for t in v.split(b","))
    return names


def strip_hop_by_hop(headers: Headers, also: frozenset[bytes] = frozenset()) -> Headers:
    """Headers minus hop-by-hop ones, framing ones and `also` (all names lowercase)."""
    drop = connection_tokens(headers)
    return [
        (k, v)
        for k, v in headers
        if (lk := k.lower()) not in HOP_BY_HOP
        and lk not in FRAMING
        and lk not in drop
        and lk not in also
    ]


@dataclass(slots=True)
class Exchange:
    """One request and its response on a downstream connection."""

    method: bytes
    target: bytes
    headers: Headers
    version: str
    keep_alive: bool
    start: float = field(default_factory=time.perf_counter)
    chunked: bool = False
    content_length: int | None = None
    body: list[bytes] = field(default_factory=list)  # buffered until an upstream is attached
    buffered: int = 0
    body_done: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    upstream: UpstreamConn | None = None
    status: int = 0
    response_started: bool = False
    response_chunked: bool = False
    response_close_delimited: bool = False
    finished: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # for the access log
    pool: UpstreamPool | None = None
    head: bytes = b""
    retried: bool = False
    rerouted: bool = False

    @property
    def has_body(self) -> bool:
        """Whether the request carries a body (so it cannot be replayed)."""
        return self.chunked or bool(self.content_length)


class Router:
    """What a listener decides: who may connect, where a request goes, how its head looks."""

    direction = "?"

    def accept(self, conn: DownstreamConn) -> None:
        """Called once the connection (and TLS handshake) is up; raise ProxyError to refuse."""

    def release(self, conn: DownstreamConn) -> None:
        """Called when an accepted connection is gone."""

    def route(self, conn: DownstreamConn, ex: Exchange) -> tuple[UpstreamPool, bytes]:
        """The pool to use and the request head (without framing or final CRLF)."""
        raise NotImplementedError

    def response_headers(self, conn: DownstreamConn, ex: Exchange, headers: Headers) -> Headers:
        """Headers sent back downstream (after hop-by-hop removal)."""
        return headers


_quote = json.encoder.encode_basestring_ascii  # the C string encoder json.dumps uses


class AccessLog:
    """One JSON line per request on a stream (stdout by default), flushed at least every second.

    Lines are formatted by hand: a generic json.dumps per request was a tenth
    of the proxy's time. Only these fields are ever written (never query
    strings, bodies, tokens or keys).
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._dirty = False
        self._second = -1
        self._ts = ""

    def write(
        self,
        direction: str,
        method: str,
        path: str,
        status: int,
        peer: str | None,
        ms: float,
        bytes_in: int,
        bytes_out: int,
        extra: dict[str, Any],
    ) -> None:
        """Write one record."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        line = (
            f'{{"ts":"{self._ts}","direction":"{direction}","method":{_quote(method)},'
            f'"path":{_quote(path)},"status":{status},'
            f'"peer":{_quote(peer) if peer is not None else "null"},"ms":{ms:.2f},'
            f'"bytes_in":{bytes_in},"bytes_out":{bytes_out}'
        )
        for k, v in extra.items():
            if k in ("path", "peer"):
                continue
            if isinstance(v, str):
                line += f',"{k}":{_quote(v)}'
            else:
                line += f',"{k}":{json.dumps(v)}'  # lists (dry_run, audit): rare
        self.stream.write(line + "}\n")
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_later(1.0, self._flush)

    def _flush(self) -> None:
        self._dirty = False
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


class ConnGroup:
    """The open connections of one listener: each end is reported (for the listener's
    connection limit) and all of them drain together on shutdown."""

    def __init__(self, on_release: Callable[[], None] | None = None) -> None:
        self.conns: set[DownstreamConn] = set()
        self.on_release = on_release
        self.draining = False
        self._empty: asyncio.Event | None = None

    def add(self, conn: DownstreamConn) -> None:
        """A connection is up (its TLS handshake done)."""
        self.conns.add(conn)

    def discard(self, conn: DownstreamConn) -> None:
        """A connection is gone."""
        if conn in self.conns:
            self.conns.remove(conn)
            if self.on_release is not None:
                self.on_release()
            if self._empty is not None and not self.conns:
                self._empty.set()

    def drain(self) -> None:
        """Close idle connections now; busy ones after their current response, which
        says `Connection: close`."""
        self.draining = True
        for conn in list(self.conns):
            conn.drain()

    async def wait_closed(self, timeout: float) -> int:
        """Wait until every connection has closed, at most `timeout` seconds; then close
        what is left (a request still running is cut off). The number cut off."""
        if self.conns:
            self._empty = asyncio.Event()
            try:
                await asyncio.wait_for(self._empty.wait(), timeout)
            except TimeoutError:
                pass
        left = len(self.conns)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        return left


@dataclass
class Limits:
    """Per-listener limits and timeouts (seconds)."""

    header_timeout: float = 10.0
    idle_timeout: float = 300.0
    upstream_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int | None = None


class DownstreamConn(asyncio.Protocol):
    """A client connection: parses requests, drives exchanges one at a time, in order."""

    def __init__(
        self,
        router: Router,
        limits: Limits,
        access_log: AccessLog | None,
        group: ConnGroup | None = None,
    ) -> None:
        self.router = router
        self.group = group
        self.draining = False
        self.limits = limits
        self.access_log = access_log
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.peer: dict[str, Any] = {}  # filled by the router (peer identity, XFCC, ...)
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: collections.deque[Exchange] = collections.deque()
        self.closed = False
        self._url = bytearray()
        self._in_head = False  # a request head has begun and is not complete
        self._headers: Headers = []
        self._head_bytes = 0
        self.deadline = 0.0
        self.on_deadline: Callable[[], None] | None = None
        self._cork: list[bytes] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._paused_upstream: UpstreamConn | None = None

    # -- connection ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Check the peer (router), then wait for the first request head."""
        self.transport = transport  # type: ignore[assignment]
        DEADLINES.add(self)
        if self.group is not None:
            self.group.add(self)
            if self.group.draining:
                self.draining = True
        try:
            self.router.accept(self)
        except ProxyError as e:
            log.info("%s connection refused: %s", self.router.direction, e.detail)
            transport.close()
            self.closed = True
            return
        self._arm(self.limits.header_timeout, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """Abandon whatever was in flight; the upstream connection is not reused."""
        self.closed = True
        self._disarm()
        DEADLINES.discard(self)
        if self.group is not None:
            self.group.discard(self)
        self.router.release(self)
        ex = self.active
        if ex is not None and not ex.finished and ex.upstream is not None:
            ex.upstream.abort()
        self.active = None
        self.queue.clear()

    def drain(self) -> None:
        """Shutting down: close now if idle, else after the response in progress."""
        self.draining = True
        idle = self.active is None and self.parsing is None and not self._in_head
        if idle and not self.closed and self.transport is not None:
            self._close()  # TLS close_notify, then FIN
            self.closed = True

    def pause_writing(self) -> None:
        """The client reads slower than the app writes: stop reading from the app."""
        self._writing_paused = True
        ex = self.active
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.pause_reading()
            self._paused_upstream = ex.upstream

    def resume_writing(self) -> None:
        """The client caught up."""
        self._writing_paused = False
        up, self._paused_upstream = self._paused_upstream, None
        if up is not None and up.transport is not None and not up.transport.is_closing():
            up.transport.resume_reading()

    def pause_reading(self) -> None:
        """Stop reading requests from the client (upstream is slower, or a request is queued)."""
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the client again."""
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        """Feed the parser; a parse error answers 400 (431 for a head over the limit)."""
        rest = b""
        try:
            self.parser.feed_data(data)
            if (
                not self._headers
                and self.parsing is None
                and self._url
                and data[-1:] == b"\n"
                and self.parser.get_http_version() == "0.0"
            ):
                # A request line that ended with no version (HTTP/0.9): llhttp would
                # wait for headers, and an HTTP/0.9 client sends none, so answer now.
                # (A version is recorded as soon as one is parsed; on a kept-alive
                # connection it is the last one's, and the head is refused when it
                # completes, or times out.)
                check_version("0.9")
        except httptools.HttpParserUpgrade as e:
            # Upgrades are not offered: the request was forwarded as plain HTTP;
            # whatever follows its head is parsed as the next request (below, out
            # of this handler, so that a callback's ProxyError stays the context
            # of the parser's error instead of this upgrade).
            rest = data[e.args[0] :]
        except ProxyError as e:
            self._reply_error(e.status, e.code, e.detail, close=True)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, ProxyError):
                self._reply_error(cause.status, cause.code, cause.detail, close=True)
            else:
                log.exception("parser callback failed")
                self._reply_error(500, "internal", "internal error", close=True)
        except httptools.HttpParserError as e:
            detail = str(e) or "malformed HTTP request"
            self._reply_error(400, "bad_request", f"malformed HTTP request: {detail}", close=True)
        if rest and not self.closed:
            self.data_received(rest)

    # -- parser callbacks ----------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._arm(self.limits.header_timeout, self._header_timeout)
        self._url.clear()
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_header_bytes:
            raise ProxyError(431, "headers_too_large", "request head is over the limit", True)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.limits.max_header_bytes:
            raise ProxyError(431, "headers_too_large", "request head is over the limit", True)
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        p = self.parser
        version = p.get_http_version()
        check_version(version)
        ex = Exchange(
            method=p.get_method(),
            target=bytes(self._url),
            headers=self._headers,
            version=version,
            keep_alive=p.should_keep_alive(),
        )
        expect_continue = False
        for k, v in ex.headers:
            lk = k.lower()
            if lk == b"transfer-encoding":
                if ex.chunked:
                    raise ProxyError(
                        400, "bad_transfer_encoding", "more than one Transfer-Encoding", True
                    )
                check_transfer_encoding(v, version)
                ex.chunked = True
            elif lk == b"content-length":
                try:
                    ex.content_length = int(v)
                except ValueError:
                    raise ProxyError(400, "bad_request", "bad Content-Length", True) from None
            elif lk == b"expect" and v.lower() == b"100-continue":
                expect_continue = True
        ex.headers = [(k, v) for k, v in ex.headers if k.lower() != b"expect"]
        limit = self.limits.max_body_bytes
        if limit is not None and ex.content_length is not None and ex.content_length > limit:
            raise ProxyError(413, "too_large", f"request body is over the {limit}-byte limit", True)
        if not ex.chunked and not ex.content_length:
            ex.body_done = True
        self.parsing = ex
        if expect_continue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.active is None:
            self._activate(ex)
        else:
            self.queue.append(ex)
            self.pause_reading()  # one request in flight at a time; bound what is buffered

    def on_body(self, chunk: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.bytes_in += len(chunk)
        limit = self.limits.max_body_bytes
        if limit is not None and ex.bytes_in > limit:
            raise ProxyError(413, "too_large", f"request body is over the {limit}-byte limit", True)
        up = ex.upstream
        if up is not None and up.transport is not None and ex is self.active:
            up.send_body(ex, chunk)
        else:
            ex.body.append(chunk)
            ex.buffered += len(chunk)
            if ex.buffered > PENDING_LIMIT:
                self.pause_reading()

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.body_done = True
        self.parsing = None
        up = ex.upstream
        if up is not None and up.transport is not None and ex is self.active and ex.chunked:
            up.transport.write(b"0\r\n\r\n")
        if ex is self.active and ex.upstream is not None:
            ex.upstream.request_sent()

    # -- exchanges -----------------------------------------------------

    def _activate(self, ex: Exchange) -> None:
        self.active = ex
        try:
            ex.pool, ex.head = self.router.route(self, ex)
        except ProxyError as e:
            self._finish_with_error(ex, e)
            return
        except RouteLater as later:
            if ex.rerouted:
                self._finish_with_error(ex, ProxyError(500, "internal", "internal error"))
            else:
                self.loop.create_task(self._route_later(ex, later))
            return
        up = ex.pool.take_idle()
        if up is not None:
            self._send_on(ex, up)  # the common case: no task, no await
        else:
            self.loop.create_task(self._connect_and_send(ex))

    async def _route_later(self, ex: Exchange, later: RouteLater) -> None:
        try:
            await later.wait()
        except Exception:  # the router decides again either way
            log.exception("waiting to route failed")
        ex.rerouted = True
        if not self.closed and ex is self.active:
            self._activate(ex)

    async def _connect_and_send(self, ex: Exchange) -> None:
        assert ex.pool is not None
        try:
            up = await ex.pool.connect_new()
        except ProxyError as e:
            self._finish_with_error(ex, e)
            return
        if self.closed or ex is not self.active:
            ex.pool.release(up)
            return
        self._send_on(ex, up)

    def _send_on(self, ex: Exchange, up: UpstreamConn) -> None:
        up.attach(ex, self)
        assert up.transport is not None
        if ex.chunked:
            framing = b"transfer-encoding: chunked\r\n\r\n"
        elif ex.content_length:
            framing = b"content-length: %d\r\n\r\n" % ex.content_length
        else:
            framing = b"\r\n"
        up.transport.write(ex.head + framing)
        if ex.body:
            for chunk in ex.body:
                up.send_body(ex, chunk)
            ex.body.clear()
            ex.buffered = 0
        if ex.body_done:
            if ex.chunked:
                up.transport.write(b"0\r\n\r\n")
            up.request_sent()
        if self._reading_paused:
            self.resume_reading()

    def retry(self, ex: Exchange) -> None:
        """A kept-alive connection the app had closed meanwhile: once more, on a new one."""
        ex.retried = True
        ex.upstream = None
        if not self.closed and ex is self.active:
            log.debug("reused upstream connection was closed; retrying on a new one")
            self.loop.create_task(self._connect_and_send(ex))

    def response_head(
        self, ex: Exchange, status: int, reason: bytes, headers: Headers, has_body_framing: str
    ) -> None:
        """Called by the upstream when the response head is complete."""
        if self.closed or self.transport is None:
            return
        ex.status = status
        ex.response_started = True
        headers = strip_hop_by_hop(headers)
        headers = self.router.response_headers(self, ex, headers)
        close = not ex.keep_alive or not ex.body_done or self.draining
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _REASONS.get(status, "").encode())]
        lines += [b"%s: %s\r\n" % (k, v) for k, v in headers]
        if has_body_framing == "none":
            pass
        elif has_body_framing.startswith("length:"):
            lines.append(b"content-length: " + has_body_framing[7:].encode() + b"\r\n")
        elif ex.version == "1.0":
            ex.response_close_delimited = True
            close = True
        else:
            ex.response_chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        if close:
            ex.keep_alive = False
            lines.append(b"connection: close\r\n")
        elif ex.version == "1.0":  # an HTTP/1.0 client closes unless told otherwise
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self._write(b"".join(lines))

    def response_body(self, ex: Exchange, chunk: bytes) -> None:
        """A piece of the response body from upstream."""
        if self.closed or self.transport is None:
            return
        ex.bytes_out += len(chunk)
        if ex.response_chunked:
            self._write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self._write(chunk)

    def response_done(self, ex: Exchange) -> None:
        """The upstream response is complete."""
        if ex.response_chunked and self.transport is not None and not self.closed:
            self._write(b"0\r\n\r\n")
        self._complete(ex)

    def upstream_failed(self, ex: Exchange, status: int, code: str, detail: str) -> None:
        """The upstream died or timed out; answer if we still can, else cut the client off."""
        if ex.finished:
            return
        if ex.response_started:
            ex.finished = True
            self._log(ex)
            if self.transport is not None:
                self._close()
            return
        self._finish_with_error(ex, ProxyError(status, code, detail))

    def _finish_with_error(self, ex: Exchange, err: ProxyError) -> None:
        if self.transport is None or self.closed:
            return
        close = err.close or not ex.body_done or not ex.keep_alive or self.draining
        ex.status = err.status
        ex.info.setdefault("error", err.code)
        ex.keep_alive = ex.keep_alive and not close
        self._write(
            error_bytes(
                err.status,
                err.code,
                err.detail,
                close,
                err.headers,
                err.extra,
                head_only=ex.method == b"HEAD",
            )
        )
        if not ex.body_done:
            # The rest of the request body will not be read: stop parsing this connection.
            self.parsing = None
        self._complete(ex)

    def _complete(self, ex: Exchange) -> None:
        if ex.finished:
            return
        ex.finished = True
        self._log(ex)
        if ex.upstream is not None:
            ex.upstream.detach(ex)
        if self.closed or self.transport is None:
            return
        if not ex.keep_alive or self.draining:
            self._close()
            self.closed = True
            return
        self.active = None
        if self.queue:
            nxt = self.queue.popleft()
            self._activate(nxt)
        else:
            self.resume_reading()
            self._arm(self.limits.idle_timeout, self._idle_timeout)

    def _log(self, ex: Exchange) -> None:
        if self.access_log is None:
            return
        info = ex.info
        path = info.get("path")
        if path is None:
            path = ex.target.split(b"?", 1)[0].decode("latin-1")
        self.access_log.write(
            self.router.direction,
            ex.method.decode("latin-1"),
            path,
            ex.status,
            info.get("peer", self.peer.get("spiffe_id")),
            (time.perf_counter() - ex.start) * 1000,
            ex.bytes_in,
            ex.bytes_out,
            info,
        )

    def _reply_error(self, status: int, code: str, detail: str, close: bool) -> None:
        ex = self.active or self.parsing
        if ex is not None and not ex.finished:
            if ex.response_started:
                ex.finished = True
                if self.transport is not None:
                    self._close()
                return
            if ex.upstream is not None:
                ex.upstream.abort()
            self._finish_with_error(ex, ProxyError(status, code, detail, close=True))
            return
        if self.transport is not None and not self.closed:
            self.transport.write(error_bytes(status, code, detail, close=True))
            self._close()
            self.closed = True

    # -- output: writes made while the upstream's data is parsed go out as one --

    def _write(self, data: bytes) -> None:
        if self._cork is not None:
            self._cork.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def cork(self) -> None:
        """Collect writes (one TLS record and one syscall for head, body and end)."""
        if self._cork is None:
            self._cork = []

    def uncork(self) -> None:
        """Send what was collected."""
        buf, self._cork = self._cork, None
        if buf and self.transport is not None and not self.transport.is_closing():
            self.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def _close(self) -> None:
        self.uncork()
        if self.transport is not None:
            self.transport.close()

    # -- timers --------------------------------------------------------

    def _arm(self, seconds: float, fn: Callable[[], None]) -> None:
        self.deadline = self.loop.time() + seconds
        self.on_deadline = fn

    def _disarm(self) -> None:
        self.on_deadline = None

    def _header_timeout(self) -> None:
        if self.parsing is None and not self._url and not self._headers:
            if self.transport is not None:
                self._close()  # nothing was sent: just close
            return
        self._reply_error(408, "request_timeout", "request head not received in time", True)

    def _idle_timeout(self) -> None:
        if self.active is None and self.transport is not None:
            self._close()


class UpstreamConn(asyncio.Protocol):
    """A connection to the app (inbound) or to another sidecar (outbound)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.down: DownstreamConn | None = None
        self.requests = 0
        self.keep_alive = True
        self.request_complete = False
        self.response_complete = False
        self._headers: Headers = []
        self._reason = b""
        self._head_done = False
        self._framing = "close"
        self.deadline = 0.0
        self.on_deadline: Callable[[], None] | None = None
        self._got_bytes = False
        self._paused_down: DownstreamConn | None = None
        self.peer_info: dict[str, Any] = {}
        # Which exchange's parser is being fed. A HEAD answer ends the exchange inside
        # feed_data; the next (pipelined) exchange may take this connection before the
        # old parser is done with the buffer, and what it still reports (a body the app
        # should not have sent) must not reach the new exchange.
        self._gen = 0
        self._feeding = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Connected (and for TLS, handshaken)."""
        self.transport = transport  # type: ignore[assignment]
        DEADLINES.add(self)

    def attach(self, ex: Exchange, down: DownstreamConn) -> None:
        """Bind to an exchange: a fresh parser per response (HEAD needs no body)."""
        self.ex, self.down = ex, down
        ex.upstream = self
        self.requests += 1
        self.parser = httptools.HttpResponseParser(self)
        self._gen += 1
        self._headers, self._reason, self._head_done = [], b"", False
        self.request_complete = self.response_complete = False
        self._got_bytes = False

    def detach(self, ex: Exchange) -> None:
        """The exchange is over: back to the pool if reusable."""
        self._disarm()
        if self.ex is not ex:
            return
        self.ex, self.down = None, None
        if self._paused_down is not None:
            self._paused_down.resume_reading()
            self._paused_down = None
        reusable = (
            self.keep_alive
            and self.request_complete
            and self.response_complete
            and self.transport is not None
            and not self.transport.is_closing()
        )
        if reusable:
            self.pool.release(self)
        else:
            self.abort()

    def send_body(self, ex: Exchange, chunk: bytes) -> None:
        """Forward a request body piece, framed as the request is."""
        assert self.transport is not None
        if ex.chunked:
            self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self.transport.write(chunk)

    def request_sent(self) -> None:
        """The whole request went upstream: now the response must come in time (else 504)."""
        self.request_complete = True
        if self.down is not None and not self._head_done:
            self.arm_response_timeout(self.down.limits.upstream_timeout)

    def abort(self) -> None:
        """Drop the connection (never reused)."""
        self._disarm()
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def arm_response_timeout(self, seconds: float) -> None:
        """504 if the response head does not arrive in time."""
        self.deadline = asyncio.get_running_loop().time() + seconds
        self.on_deadline = self._timeout

    def _disarm(self) -> None:
        self.on_deadline = None

    def _timeout(self) -> None:
        ex, down = self.ex, self.down
        self.abort()
        if ex is not None and down is not None:
            down.upstream_failed(
                ex, 504, "upstream_timeout", f"{self.pool.label} did not answer in time"
            )

    # flow control: the upstream reads slower than the client sends
    def pause_writing(self) -> None:
        if self.down is not None:
            self.down.pause_reading()
            self._paused_down = self.down

    def resume_writing(self) -> None:
        down, self._paused_down = self._paused_down, None
        if down is not None:
            down.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self.ex is None:
            self.abort()  # unsolicited bytes: never reuse this connection
            return
        corked = self.down
        if corked is not None:
            corked.cork()
        self._feeding = self._gen
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            ex, down = self.ex, self.down
            self.abort()
            if ex is not None and down is not None:
                down.upstream_failed(
                    ex, 502, "bad_upstream_response", f"{self.pool.label} sent a malformed response"
                )
        finally:
            if corked is not None:
                corked.uncork()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        DEADLINES.discard(self)
        self.pool.discard(self)
        ex, down = self.ex, self.down
        if ex is None or down is None:
            return
        if (
            not self._got_bytes
            and self.requests > 1
            and not ex.has_body
            and not ex.retried
            and ex.method in IDEMPOTENT
        ):
            # A kept-alive connection the app closed while idle, or after it took the
            # request: only a request that may run twice is sent again (RFC 9110 9.2.2).
            self.ex = self.down = None
            down.retry(ex)
            return
        if self._head_done and self._framing == "close":
            self.response_complete = True
            self.keep_alive = False
            down.response_done(ex)
            return
        down.upstream_failed(ex, 502, "upstream_reset", f"{self.pool.label} closed the connection")

    # parser callbacks
    def on_status(self, reason: bytes) -> None:
        if self._feeding == self._gen:
            self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._feeding == self._gen:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._feeding != self._gen:
            return
        self._disarm()
        ex, down = self.ex, self.down
        status = self.parser.get_status_code()
        if ex is None or down is None:
            return
        if status < 200:  # interim (100, 103): not forwarded; wait for the final answer
            self._headers, self._reason = [], b""
            return
        self._head_done = True
        self.keep_alive = self.parser.should_keep_alive()
        length = None
        chunked = False
        for k, v in self._headers:
            lk = k.lower()
            if lk == b"content-length":
                length = v.strip()
            elif lk == b"transfer-encoding":
                chunked = True
        if ex.method == b"HEAD":
            framing = "none" if length is None else "length:" + length.decode("latin-1")
            headers = [(k, v) for k, v in self._headers if k.lower() != b"content-length"]
            down.response_head(ex, status, self._reason, strip_hop_by_hop(headers), framing)
            # No body follows a HEAD answer, whatever it says: the exchange is over.
            self._framing = "length"
            self.response_complete = True
            down.response_done(ex)
            return
        if status in BODYLESS_STATUS:
            self._framing = "none"
            down.response_head(ex, status, self._reason, self._headers, "none")
            return
        if chunked:
            self._framing = "chunked"
            down.response_head(ex, status, self._reason, self._headers, "chunked")
        elif length is not None:
            self._framing = "length"
            down.response_head(
                ex, status, self._reason, self._headers, "length:" + length.decode("latin-1")
            )
        else:
            self._framing = "close"
            self.keep_alive = False
            down.response_head(ex, status, self._reason, self._headers, "chunked")

    def on_body(self, chunk: bytes) -> None:
        if self.ex is not None and self.down is not None and self._feeding == self._gen:
            self.down.response_body(self.ex, chunk)

    def on_message_complete(self) -> None:
        ex, down = self.ex, self.down
        if ex is None or down is None or not self._head_done or ex.finished:
            return
        if self._feeding != self._gen:
            return
        self.response_complete = True
        down.response_done(ex)


class UpstreamPool:
    """Kept-alive connections to one destination, opened on demand, round robin over endpoints."""

    def __init__(
        self,
        label: str,
        endpoints: list[tuple[str, int]],
        connect: Callable[[UpstreamPool, str, int], Any],
        connect_timeout: float = 5.0,
        max_idle: int = 128,
        unavailable: tuple[int, str] = (503, "upstream_unavailable"),
    ) -> None:
        self.label = label
        self.endpoints = endpoints
        self._connect = connect
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.unavailable = unavailable
        self.idle: list[UpstreamConn] = []
        self.conns: set[UpstreamConn] = set()
        self._next = 0

    def take_idle(self) -> UpstreamConn | None:
        """A kept-alive connection, if one is idle and open."""
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect_new(self) -> UpstreamConn:
        """A new connection, round robin over endpoints; ProxyError (503 or the router's)."""
        last = "no endpoints"
        for _ in range(len(self.endpoints)):
            host, port = self.endpoints[self._next % len(self.endpoints)]
            self._next += 1
            try:
                conn = await asyncio.wait_for(self._connect(self, host, port), self.connect_timeout)
                self.conns.add(conn)
                return conn
            except ProxyError:
                raise
            except (OSError, TimeoutError) as e:
                last = f"{type(e).__name__}"
                log.warning("cannot connect to %s at %s:%d: %s", self.label, host, port, e)
        status, code = self.unavailable
        raise ProxyError(status, code, f"{self.label} is unavailable ({last})")

    def release(self, conn: UpstreamConn) -> None:
        """Return a healthy, idle connection."""
        if len(self.idle) < self.max_idle and conn.transport is not None:
            self.idle.append(conn)
        else:
            conn.abort()

    def discard(self, conn: UpstreamConn) -> None:
        """Forget a connection that closed."""
        self.conns.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def abort_where(self, predicate: Callable[[UpstreamConn], bool]) -> int:
        """Abort every connection (idle or busy) for which `predicate` holds."""
        doomed = [c for c in self.conns if predicate(c)]
        for c in doomed:
            c.abort()
        return len(doomed)

    def close(self) -> None:
        """Close every idle connection."""
        for conn in self.idle:
            conn.abort()
        self.idle.clear()
