"""The HTTP/1.1 server side: one client connection, its requests parsed and answered in order.

Protocol-level and streaming: llhttp parses each request head in one C call,
bodies are forwarded piece by piece with flow control in both directions (a
1 GiB upload is never held in memory), and upstream connections come from the
router's pool and are kept alive. Requests on one connection are handled one at
a time: a pipelined request waits (and reading pauses) until the one before it
has its answer. What differs between inbound and outbound (who may connect,
where a request goes, which headers change) is the router's; framing rules are
in `framing`; this module drives the exchange.

Checked when a head is complete, before the router runs, so a refused request
never sends a byte upstream: the version, the transfer coding, the body limit.
`Expect: 100-continue` is answered here, as Envoy does, and not forwarded.
Trailers are dropped. A WebSocket upgrade (`GET` with `Connection: upgrade` and
`Upgrade: websocket`) is routed like any request (authentication, policy) and
forwarded with its upgrade headers; when the upstream answers `101`, both
connections become one byte pipe (`engines.tcp.pipe`) until either side closes
or nothing moves for `idle_timeout`; any other answer is passed on and the
connection closes. Other upgrades (h2c) are not offered: the request is
forwarded as plain HTTP/1.1 without its upgrade headers. `CONNECT` is the
router's to accept (`Router.tunnel`); the protocol it names takes the
connection over, with whatever bytes followed the request head.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Protocol

import httptools

from sidecar.engines.base import DEADLINES, ConnGroup, Limits, refuse_connection
from sidecar.engines.http1.exchange import Exchange, Upstream
from sidecar.engines.http1.framing import (
    LAST_CHUNK,
    Framing,
    Headers,
    Kind,
    check_version,
    chunk,
    client_head,
    error_response,
    header_value,
    request_framing,
    response_head,
    strip_hop_by_hop,
    to_client,
)
from sidecar.engines.http1.router import RouteLater, Router
from sidecar.engines.tcp.pipe import Pipe, splice
from sidecar.errors import SidecarError
from sidecar.identity.peer import LOCAL_APP, Peer
from sidecar.telemetry.record import ExchangeRecord, new_record
from sidecar.upstream.endpoint import Endpoint
from sidecar.upstream.retry import CONNECT_FAILURE

log = logging.getLogger("sidecar.proxy")

PENDING_LIMIT = 1 << 20  # body bytes buffered before an upstream connection is ready
MAX_PIPELINED = 32  # requests queued behind the one in flight; past it, 400 and close
# A connector's refusals that mean the endpoint is not who it must be (tried elsewhere).
PEER_FAILURES = frozenset({"peer_verification_failed", "peer_identity_mismatch", "peer_revoked"})


class RecordSink(Protocol):
    """Where finished exchanges are recorded (the access log)."""

    def write(self, rec: ExchangeRecord) -> None:
        """Record one exchange."""


# What a closed connection's parser is replaced with (it has no callbacks to call).
_NO_PARSER = httptools.HttpRequestParser(object())


class DownstreamConn(asyncio.Protocol):
    """A client connection: parses requests, drives exchanges one at a time, in order."""

    def __init__(
        self,
        router: Router,
        limits: Limits,
        access_log: RecordSink | None = None,
        group: ConnGroup | None = None,
    ) -> None:
        self.router = router
        # The router does not rewrite answers (Router's own response_headers).
        self._plain_responses = type(router).response_headers is Router.response_headers
        self.group = group
        self.draining = False
        self.limits = limits
        self.access_log = access_log
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.peer: Peer = LOCAL_APP  # what the router's accept() found
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: collections.deque[Exchange] = collections.deque()
        self.closed = False
        self._url = bytearray()
        self._in_head = False  # a request head has begun and is not complete
        self._headers: Headers = []
        self._head_bytes = 0
        self._head_fed = 0  # bytes read while one head was incomplete (a line still arriving)
        self._begins = 0  # messages begun on this connection
        self.deadline = 0.0
        self.on_deadline: Callable[[], None] | None = None
        self._cork: list[bytes] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._paused_upstream: Upstream | None = None
        # CONNECT accepted by the router: the protocol that takes the connection over once
        # the bytes after the request head are known; an upgrade's early bytes until 101.
        self._tunnel: Callable[[], asyncio.Protocol] | None = None
        self._upgrade_rest = b""
        self.pipe: Pipe | None = None

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
            self.peer = self.router.accept(self)
        except SidecarError as e:
            refuse_connection(self.router.direction, self.access_log, transport, e.code, e.detail)
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
        if ex is not None and not ex.finished:
            # The client hung up before its answer was complete: not the endpoint's fault
            # (not counted against it), and recorded, as Envoy's DC.
            if ex.upstream is not None:
                ex.upstream.cancel()
            ex.finished = True
            self._release(ex)
            ex.record.error = "client_disconnected"
            self._record(ex)
        self.active = None
        self.queue.clear()
        # The parser's callbacks are bound to this object: without the cycle, the closed
        # connection (and its TLS transport's buffers) is freed at once rather than at the
        # next full garbage collection.
        self.parser = _NO_PARSER

    def drain(self) -> None:
        """Shutting down: close now if idle, else after the response in progress (a
        WebSocket pipe may run until the drain time is over)."""
        self.draining = True
        if self.pipe is not None:
            return
        idle = self.active is None and not self.queue and self.parsing is None and not self._in_head
        if idle and not self.closed and self.transport is not None:
            self._close()  # TLS close_notify, then FIN
            self.closed = True

    def pause_writing(self) -> None:
        """The client reads slower than the app writes: stop reading from the app."""
        self._writing_paused = True
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()
            self._paused_upstream = ex.upstream

    def resume_writing(self) -> None:
        """The client caught up."""
        self._writing_paused = False
        up, self._paused_upstream = self._paused_upstream, None
        if up is not None:
            up.resume_reading()

    def pause_reading(self) -> None:
        """Stop reading requests from the client (upstream is slower, or a request is queued)."""
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the client again (not while an upgrade waits for its 101: what the
        client sends then belongs to the new protocol)."""
        ex = self.active
        if ex is not None and ex.upgrade and not ex.finished:
            return
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        """Feed the parser; a parse error answers 400 (431 for a head over the limit)."""
        rest = b""
        begins = self._begins
        try:
            self.parser.feed_data(data)
            if self._in_head and self._begins == begins:
                # All of `data` belongs to one unfinished head: llhttp holds a header
                # line until it ends, so its size is counted here, as it arrives.
                self._head_fed += len(data)
                if self._head_fed > self.limits.max_header_bytes:
                    raise SidecarError(
                        "headers_too_large", "request head is over the limit", close=True
                    )
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
            # A CONNECT the router accepted, or a WebSocket upgrade waiting for its 101:
            # what follows the head belongs to the tunnel. Any other upgrade is not
            # offered: the request was forwarded as plain HTTP, and what follows its head
            # is parsed as the next request (below, out of this handler, so that a
            # callback's SidecarError stays the context of the parser's error instead
            # of this upgrade).
            rest = data[e.args[0] :]
            if self._tunnel is not None:
                self._open_tunnel(rest)
                return
            ex = self.active or (self.queue[-1] if self.queue else None)
            if ex is not None and ex.upgrade and not ex.finished:
                self._upgrade_rest += rest
                self.pause_reading()
                return
        except SidecarError as e:
            self._reply_error(e)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, SidecarError):
                self._reply_error(cause)
            else:
                log.exception("parser callback failed")
                self._reply_error(SidecarError("internal", "internal error"))
        except httptools.HttpParserError as e:
            detail = str(e) or "malformed HTTP request"
            self._reply_error(SidecarError("bad_request", f"malformed HTTP request: {detail}"))
        if self._tunnel is not None and not self.closed:
            self._open_tunnel(b"")
        elif rest and not self.closed:
            self.data_received(rest)

    # -- parser callbacks ----------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._begins += 1
        self._head_fed = 0
        self.deadline = self.loop.time() + self.limits.header_timeout  # (_arm, inlined)
        self.on_deadline = self._header_timeout
        self._url.clear()
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_header_bytes:
            raise SidecarError("headers_too_large", "request head is over the limit", close=True)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.limits.max_header_bytes:
            raise SidecarError("headers_too_large", "request head is over the limit", close=True)
        if self._in_head:  # (llhttp reports a chunked body's trailers here too: dropped)
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        p = self.parser
        version = p.get_http_version()
        if version != "1.1":
            check_version(version)
        framing, expect, listed = request_framing(self._headers, version)
        has_body = framing.kind is not Kind.NONE
        headers = self._headers
        if expect is not None:
            # Expect is the sidecar's to answer (100-continue) or ignore: never forwarded.
            headers = [(k, v) for k, v in headers if k != b"expect"]
        # RFC 9110 10.1.1: an HTTP/1.0 client knows no interim answers; a request with
        # no body needs no go-ahead.
        expect_continue = bool(expect) and version == "1.1" and has_body
        method = p.get_method()
        ex = Exchange(
            method,
            bytes(self._url),
            headers,
            version,
            p.should_keep_alive(),
            new_record(self.router.direction, self.peer.spiffe_id),
            framing,
            not has_body,
            listed,
            expect_continue,
        )
        if p.should_upgrade():
            if has_body:
                # llhttp does not read the body of an upgrade request (or a CONNECT): the
                # bytes after the head would be parsed as the next request here while the
                # app, told their length, reads them as this one's body, so a request the
                # policy never saw would reach it. Refused, as nobody sends a body here.
                raise SidecarError(
                    "bad_request", "an upgrade or CONNECT request cannot have a body", close=True
                )
            wanted = (header_value(headers, b"upgrade") or b"").strip().lower()
            if wanted == b"websocket" and method == b"GET":
                ex.upgrade = wanted
                ex.keep_alive = False  # after a refused upgrade the connection closes
        limit = self.limits.max_body_bytes
        if limit is not None and framing.kind is Kind.LENGTH and framing.length > limit:
            raise SidecarError(
                "too_large", f"request body is over the {limit}-byte limit", close=True
            )
        self.parsing = ex
        if self.active is None and not self.queue:
            self._activate(ex)
        else:
            if len(self.queue) >= MAX_PIPELINED:
                raise SidecarError("bad_request", "too many pipelined requests", close=True)
            # Its 100 Continue waits too: the answer in progress must not be cut into.
            self.queue.append(ex)
            self.pause_reading()  # one request in flight at a time; bound what is buffered

    def on_body(self, data: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.bytes_in += len(data)
        limit = self.limits.max_body_bytes
        if limit is not None and ex.bytes_in > limit:
            raise SidecarError(
                "too_large", f"request body is over the {limit}-byte limit", close=True
            )
        up = ex.upstream
        if up is not None and ex is self.active:
            up.send_body(ex, data)
        else:
            ex.body.append(data)
            ex.buffered += len(data)
            if ex.buffered > PENDING_LIMIT:
                self.pause_reading()

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        if ex.body_done:  # a request with no body: it was all sent with its head
            return
        ex.body_done = True
        if ex is self.active and ex.upstream is not None:
            ex.upstream.end_request(ex)

    # -- exchanges -----------------------------------------------------

    def _activate(self, ex: Exchange) -> None:
        self.active = ex
        if ex.continue_pending:
            ex.continue_pending = False
            if not ex.body_done:
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if ex.method == b"CONNECT":
            try:
                if self.queue or self._begins > 1:
                    raise SidecarError("bad_request", "CONNECT must be a connection's only request")
                self._tunnel = self.router.tunnel(self, ex)
            except SidecarError as e:
                ex.keep_alive = False
                self._finish_with_error(ex, e)
            return  # taken over once the parser says where the head ends
        try:
            ex.pool, ex.head = pool, _ = self.router.route(self, ex)
        except SidecarError as e:
            self._finish_with_error(ex, e)
            return
        except RouteLater as later:
            if ex.rerouted:
                self._finish_with_error(ex, SidecarError("internal", "internal error"))
            else:
                self.loop.create_task(self._route_later(ex, later))
            return
        if not pool.admit():
            self._finish_with_error(
                ex, SidecarError("overloaded", f"{pool.label}: too many requests in flight")
            )
            return
        ex.admitted = True
        if ex.delay:
            self.loop.call_later(ex.delay, self._after_delay, ex)
        else:
            self._dispatch(ex)

    def _after_delay(self, ex: Exchange) -> None:
        if not self.closed and ex is self.active and not ex.finished:
            self._dispatch(ex)

    def _dispatch(self, ex: Exchange) -> None:
        """Pick an endpoint for the next try; send on an idle connection or dial one."""
        pool = ex.pool
        assert pool is not None
        if pool.timeout is not None and not ex.deadline_at:
            # the whole request's time starts with its first try (after an injected delay)
            ex.deadline_at = self.loop.time() + pool.timeout
        ep = pool.pick(ex.subset, ex.tried)
        if ep is None:
            where = f" (subset {ex.subset})" if ex.subset else ""
            self._finish_with_error(
                ex, SidecarError(pool.unavailable, f"{pool.label} has no endpoints{where}")
            )
            return
        up = pool.take_idle(ep)
        if up is not None:
            self._send_on(ex, up)  # the common case: no task, no await
        else:
            self.loop.create_task(self._connect_and_send(ex, ep))

    async def _route_later(self, ex: Exchange, later: RouteLater) -> None:
        try:
            await later.wait()
        except Exception:  # the router decides again either way
            log.exception("waiting to route failed")
        ex.rerouted = True
        if not self.closed and ex is self.active:
            self._activate(ex)

    async def _connect_and_send(self, ex: Exchange, ep: Endpoint) -> None:
        pool = ex.pool
        assert pool is not None
        try:
            up = await pool.connect(ep)
        except SidecarError as e:
            if e.code in PEER_FAILURES:  # the endpoint is not who it must be: try another
                pool.failed(ep)
                if self._may_retry(ex, CONNECT_FAILURE, ep):
                    self._dispatch(ex)
                    return
            self._finish_with_error(ex, e)
            return
        except (OSError, TimeoutError) as e:
            log.warning("cannot connect to %s at %s: %s", pool.label, ep, e or type(e).__name__)
            pool.failed(ep)
            if self.closed or ex is not self.active:
                return
            if self._may_retry(ex, CONNECT_FAILURE, ep):
                self._dispatch(ex)
                return
            self._finish_with_error(
                ex,
                SidecarError(pool.unavailable, f"{pool.label} is unavailable ({type(e).__name__})"),
            )
            return
        if self.closed or ex is not self.active:
            pool.release(up)
            return
        self._send_on(ex, up)

    def _send_on(self, ex: Exchange, up: Upstream) -> None:
        pool = ex.pool
        assert pool is not None
        timeout = pool.per_try_timeout or self.limits.upstream_timeout
        if ex.deadline_at:
            timeout = min(timeout, ex.deadline_at - self.loop.time())
            if timeout <= 0:  # the request's time ran out waiting: nothing is sent
                pool.release(up)
                why = f"{pool.label} did not answer in time"
                self._finish_with_error(ex, SidecarError("upstream_timeout", why))
                return
        up.send_request(ex, self, timeout)
        if self._writing_paused:  # the client has not drained the last answer yet
            up.pause_reading()
            self._paused_upstream = up
        # Read the client again, unless a pipelined request waits or the body just sent
        # filled the upstream's buffer (its resume_writing resumes the client then).
        if self._reading_paused and not self.queue and not up.write_paused:
            self.resume_reading()

    # -- tunnels and upgrades ---------------------------------------------

    def _open_tunnel(self, rest: bytes) -> None:
        """CONNECT: the router's protocol takes the connection over (it answers the CONNECT)."""
        make, self._tunnel = self._tunnel, None
        assert make is not None and self.transport is not None
        transport = self.transport
        self.closed = True
        self.active = None
        self._disarm()
        DEADLINES.discard(self)
        self.router.release(self)
        if self.group is not None:
            self.group.forget(self)  # the new owner joins the group itself
        proto = make()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if rest and not transport.is_closing():
            proto.data_received(rest)

    def upgraded(self, ex: Exchange, headers: Headers, up: asyncio.Transport, rest: bytes) -> None:
        """The upstream switched protocols (101): answer the client, then pipe the bytes."""
        self.uncork()  # the 101 goes out before anything the pipe writes
        if self.closed or self.transport is None or ex is not self.active:
            up.abort()
            return
        ex.status = 101
        ex.response_started = True
        headers = strip_hop_by_hop(headers)
        headers = self.router.response_headers(self, ex, headers)
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        lines += [b"%s: %s\r\n" % (k, v) for k, v in headers]
        lines.append(b"connection: upgrade\r\nupgrade: %s\r\n\r\n" % ex.upgrade)
        self.transport.write(b"".join(lines))
        ex.record.protocol = ex.upgrade.decode("ascii")
        ex.finished = True
        self._release(ex)
        self._record(ex)
        self.active = None
        self._disarm()
        DEADLINES.discard(self)
        self.closed = True  # this object only keeps the connection's place in its group now
        pending, self._upgrade_rest = self._upgrade_rest, b""
        self.pipe = splice(
            self.transport,
            up,
            idle_timeout=self.limits.idle_timeout,
            a_pending=pending,
            b_pending=rest,
            on_close=self._pipe_closed,
        )

    def _pipe_closed(self, pipe: Pipe) -> None:
        if self.group is not None:
            self.group.discard(self)
        self.router.release(self)

    # -- what the upstream connection calls (its ResponseSink) ----------

    def retry(self, ex: Exchange) -> None:
        """A kept-alive connection the app had closed meanwhile: once more, on a new one."""
        ex.retried = True
        ex.upstream = None
        if not self.closed and ex is self.active:
            log.debug("reused upstream connection was closed; retrying on a new one")
            pool = ex.pool
            assert pool is not None
            ep = pool.pick(ex.subset, ex.tried)
            if ep is None:
                self._finish_with_error(ex, SidecarError(pool.unavailable, f"{pool.label} is gone"))
                return
            self.loop.create_task(self._connect_and_send(ex, ep))

    def retry_status(self, ex: Exchange, status: int) -> bool:
        """An answer with a status the service retries on: drop it and try elsewhere."""
        pool = ex.pool
        up = ex.upstream
        if pool is None or up is None or ex.response_started:
            return False
        if not pool.retry.retries_status(status):
            return False
        if not self._may_retry(ex, str(status), up.endpoint):
            return False
        ex.upstream = None
        self.loop.call_soon(self._redispatch, ex)
        return True

    def _redispatch(self, ex: Exchange) -> None:
        if not self.closed and ex is self.active and not ex.finished:
            self._dispatch(ex)

    def _may_retry(self, ex: Exchange, cause: str, ep: Endpoint | None) -> bool:
        """Whether the exchange may go out once more after `cause` at `ep` (then counted)."""
        if self.closed or ex is not self.active:
            return False
        return ex.may_retry(cause, ep, self.loop.time())

    def response_head(
        self, ex: Exchange, status: int, reason: bytes, headers: Headers, framing: Framing
    ) -> None:
        """The response head is complete: rewrite it for the client and send it."""
        if self.closed or self.transport is None:
            return
        ex.status = status
        ex.response_started = True
        ex.response = out = to_client(framing, ex.version)
        close = not ex.keep_alive or not ex.body_done or self.draining or out.kind is Kind.CLOSE
        if close:
            ex.keep_alive = False
        if self._plain_responses:  # the router leaves answers as they are: one pass
            self._write(client_head(status, reason, headers, out, close, ex.version))
            return
        headers = self.router.response_headers(self, ex, strip_hop_by_hop(headers))
        self._write(response_head(status, reason, headers, out, close, ex.version))

    def response_body(self, ex: Exchange, data: bytes) -> None:
        """A piece of the response body from upstream."""
        if self.closed or self.transport is None:
            return
        ex.bytes_out += len(data)
        if ex.response.kind is Kind.CHUNKED:
            self._write(chunk(data))
        else:
            self._write(data)

    def response_trailers(self, ex: Exchange, trailers: Headers) -> None:
        """Trailers are not passed to an HTTP/1.1 client (see the module docstring)."""

    def response_done(self, ex: Exchange) -> None:
        """The upstream response is complete."""
        if ex.response.kind is Kind.CHUNKED and self.transport is not None and not self.closed:
            self._write(LAST_CHUNK)
        self._complete(ex)

    def upstream_failed(self, ex: Exchange, err: SidecarError, cause: str | None = None) -> None:
        """The upstream died or timed out: retry if allowed, else answer if we still can,
        else cut the client off."""
        if ex.finished:
            return
        up = ex.upstream
        if cause is not None and not ex.response_started:
            ep = up.endpoint if up is not None else None
            if self._may_retry(ex, cause, ep):
                ex.upstream = None
                self._dispatch(ex)
                return
        if ex.response_started:
            ex.finished = True
            self._release(ex)
            self._record(ex)
            if self.transport is not None:
                self._close()
            return
        self._finish_with_error(ex, err)

    # -- endings -------------------------------------------------------

    def _finish_with_error(self, ex: Exchange, err: SidecarError) -> None:
        if self.transport is None or self.closed:
            return
        close = err.close or not ex.body_done or not ex.keep_alive or self.draining
        ex.status = err.status
        if ex.record.error is None:
            ex.record.error = err.code
        ex.keep_alive = ex.keep_alive and not close
        self._write(error_response(err, close, head_only=ex.method == b"HEAD"))
        if not ex.body_done:
            # The rest of the request body will not be read: stop parsing this connection.
            self.parsing = None
        self._complete(ex)

    def _release(self, ex: Exchange) -> None:
        """The pool stops counting the exchange (in flight, retrying)."""
        if ex.admitted:
            ex.admitted = False
            assert ex.pool is not None
            ex.pool.done(ex.retrying)

    def _complete(self, ex: Exchange) -> None:
        if ex.finished:
            return
        ex.finished = True
        if ex.admitted:  # (_release and _record, inlined: once per request)
            ex.admitted = False
            ex.pool.done(ex.retrying)  # type: ignore[union-attr]
        if self.access_log is not None:
            self.access_log.write(ex.finished_record())
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
            # The next one on the next loop turn, not nested in this call: a long run of
            # pipelined requests answered at once must not grow the stack.
            self.loop.call_soon(self._activate_next)
        else:
            self.resume_reading()
            self._arm(self.limits.idle_timeout, self._idle_timeout)

    def _activate_next(self) -> None:
        if not self.closed and self.active is None and self.queue:
            self._activate(self.queue.popleft())

    def _record(self, ex: Exchange) -> None:
        if self.access_log is not None:
            self.access_log.write(ex.finished_record())

    def _reply_error(self, err: SidecarError) -> None:
        """A request the parser could not go on with: answer it and close the connection."""
        err.close = True
        ex = self.active or self.parsing
        if ex is not None and not ex.finished:
            if ex.response_started:
                ex.finished = True
                self._release(ex)
                if ex.upstream is not None:
                    ex.upstream.abort()
                if self.transport is not None:
                    self._close()
                return
            if ex.upstream is not None:
                ex.upstream.abort()
            self._finish_with_error(ex, err)
            return
        if self.transport is not None and not self.closed:
            self.transport.write(error_response(err, close=True))
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
        self._reply_error(SidecarError("request_timeout", "request head not received in time"))

    def _idle_timeout(self) -> None:
        if self.active is None and not self.queue and self.transport is not None:
            self._close()
