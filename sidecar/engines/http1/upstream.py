"""The HTTP/1.1 client side: one connection to the app (inbound) or to another sidecar (outbound).

It sends one exchange's request at a time and parses the answer with llhttp,
handing head, body pieces and the end to the downstream connection through
`ResponseSink`, the only thing it knows of it. When the connection dies, it
reports what happened: a kept-alive connection that died before any byte of
an answer may be retried (the pool's `RetryPolicy` decides), an answer framed
by close is complete, anything else is a 502.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

import httptools

from sidecar.engines.base import DEADLINES
from sidecar.engines.http1.exchange import Exchange
from sidecar.engines.http1.framing import (
    LAST_CHUNK,
    NO_BODY,
    Framing,
    Headers,
    Kind,
    chunk,
    framing_header,
    response_framing,
    strip_hop_by_hop,
)
from sidecar.errors import SidecarError
from sidecar.identity.peer import LOCAL_APP, Peer

if TYPE_CHECKING:
    from collections.abc import Callable

    from sidecar.upstream.endpoint import Endpoint
    from sidecar.upstream.pool import UpstreamPool

log = logging.getLogger("sidecar.proxy")

RESET = "reset"  # causes of a failed try (sidecar.upstream.retry names the same)
TIMEOUT = "timeout"


class ResponseSink(Protocol):
    """What an upstream connection tells the downstream connection it serves."""

    def response_head(
        self, ex: Exchange, status: int, reason: bytes, headers: Headers, framing: Framing
    ) -> None:
        """The final response head is complete; `framing` is how upstream delimits the body."""

    def response_body(self, ex: Exchange, data: bytes) -> None:
        """A piece of the response body."""

    def response_trailers(self, ex: Exchange, trailers: Headers) -> None:
        """Trailers of the response (from an HTTP/2 upstream), before `response_done`."""

    def upgraded(self, ex: Exchange, headers: Headers, up: asyncio.Transport, rest: bytes) -> None:
        """The upstream answered 101 to an upgrade: `up` is handed over (`rest` followed)."""

    def response_done(self, ex: Exchange) -> None:
        """The response is complete."""

    def upstream_failed(self, ex: Exchange, err: SidecarError, cause: str | None) -> None:
        """The upstream died (cause `reset`), timed out (`timeout`) or answered garbage
        (None); the connection is already given up."""

    def retry(self, ex: Exchange) -> None:
        """A kept-alive connection was dead before it answered: send the request again."""

    def retry_status(self, ex: Exchange, status: int) -> bool:
        """Whether an answer with `status` is dropped and the request sent elsewhere
        (True: the downstream has taken the request back)."""

    def pause_reading(self) -> None:
        """Stop reading the request (upstream is slower than the client)."""

    def resume_reading(self) -> None:
        """Read the request again."""

    def cork(self) -> None:
        """Collect writes until `uncork` (one TLS record for what one read produced)."""

    def uncork(self) -> None:
        """Send what was collected."""


# What a closed connection's parser is replaced with (it has no callbacks to call).
_NO_PARSER = httptools.HttpResponseParser(object())


class UpstreamConn(asyncio.Protocol):
    """A connection to the app (inbound) or to another sidecar (outbound)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.endpoint: Endpoint | None = None  # set by the pool once connected
        self.transport: asyncio.Transport | None = None
        self._time = asyncio.get_event_loop().time  # (looked up once, not per request)
        self.peer: Peer = LOCAL_APP  # outbound: the verified server
        # Called once, the first time the connection is fit for reuse (outbound: keep its
        # TLS session, whose ticket has arrived by then, for the next connection).
        self.on_reusable: Callable[[], None] | None = None
        self.parser = httptools.HttpResponseParser(self)
        # The parser stopped right after a whole response (so llhttp starts the next one
        # afresh) and may be reused; not after a HEAD answer (llhttp would read the next
        # response as its body), an upgrade, or bytes past the end.
        self._parser_clean = True
        self.ex: Exchange | None = None
        self.down: ResponseSink | None = None
        self.requests = 0
        self.keep_alive = True
        self.request_complete = False
        self.response_complete = False
        self._headers: Headers = []
        self._reason = b""
        self._head_done = False
        self._framing = NO_BODY  # how the response being read is delimited
        self._response_timeout = 0.0
        self.deadline = 0.0
        self.on_deadline: Callable[[], None] | None = None
        self._got_bytes = False
        self.write_paused = False  # its transport is over the high-water mark
        self._paused_down: ResponseSink | None = None
        # Which exchange's parser is being fed. A HEAD answer ends the exchange inside
        # feed_data; the next (pipelined) exchange may take this connection before the
        # old parser is done with the buffer, and what it still reports (a body the app
        # should not have sent) must not reach the new exchange.
        self._gen = 0
        self._feeding = 0
        self._switching = False  # a 101 to an upgrade request: the rest is the new protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Connected (and for TLS, handshaken)."""
        self.transport = transport  # type: ignore[assignment]
        DEADLINES.add(self)

    # -- what the downstream connection calls ---------------------------

    def send_request(self, ex: Exchange, down: ResponseSink, response_timeout: float) -> None:
        """Take `ex`: send its head and whatever of its body has arrived (the parser is made
        afresh unless the last one stopped at the end of a whole response)."""
        assert self.transport is not None
        self.ex, self.down = ex, down
        ex.upstream = self
        if self.endpoint is not None:
            self.endpoint.active += 1
        self.requests += 1
        if not self._parser_clean:
            self.parser = httptools.HttpResponseParser(self)
        self._parser_clean = False
        self._gen += 1
        self._headers, self._reason, self._head_done = [], b"", False
        self.request_complete = self.response_complete = False
        self._got_bytes = False
        self._response_timeout = response_timeout
        if ex.framing is NO_BODY and not ex.upgrade:  # (a GET: the common case)
            self.transport.write(ex.head + b"\r\n")
        else:
            upgrade = b"connection: upgrade\r\nupgrade: %s\r\n" % ex.upgrade if ex.upgrade else b""
            self.transport.write(ex.head + framing_header(ex.framing) + upgrade + b"\r\n")
        if ex.body:
            for piece in ex.body:
                self.send_body(ex, piece)
            ex.body.clear()
            ex.buffered = 0
        if ex.body_done:
            self.end_request(ex)

    def send_body(self, ex: Exchange, data: bytes) -> None:
        """Forward a request body piece, framed as the request is."""
        assert self.transport is not None
        if ex.framing.kind is Kind.CHUNKED:
            self.transport.write(chunk(data))
        else:
            self.transport.write(data)

    def end_request(self, ex: Exchange) -> None:
        """The whole request went upstream: now the response must come in time (else 504)."""
        if ex.framing.kind is Kind.CHUNKED and self.transport is not None:
            self.transport.write(LAST_CHUNK)
        self.request_complete = True
        if self.down is not None and not self._head_done:
            self.deadline = self._time() + self._response_timeout
            self.on_deadline = self._timeout

    def pause_reading(self) -> None:
        """The client reads slower than the upstream writes."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """The client caught up."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def detach(self, ex: Exchange) -> None:
        """The exchange is over: back to the pool if reusable."""
        self.on_deadline = None
        if self.ex is not ex:
            return
        if self.endpoint is not None:  # (_unbind, inlined: once per request)
            self.endpoint.active -= 1
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
            first = self.on_reusable
            if first is not None:
                self.on_reusable = None
                first()
            self.pool.release(self)
        else:
            self.abort()

    def cancel(self) -> None:
        """The client is gone: drop the connection without counting it against the endpoint."""
        self._unbind()
        self._gen += 1
        self.abort()

    def abort(self) -> None:
        """Drop the connection (never reused)."""
        self._disarm()
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    # -- timers and flow control ----------------------------------------

    def _disarm(self) -> None:
        self.on_deadline = None

    def _unbind(self) -> None:
        """This connection no longer serves its exchange."""
        if self.ex is not None and self.endpoint is not None:
            self.endpoint.active -= 1
        self.ex, self.down = None, None

    def _timeout(self) -> None:
        if self.endpoint is not None:
            self.pool.failed(self.endpoint)
        err = SidecarError("upstream_timeout", f"{self.pool.label} did not answer in time")
        self._fail(err, TIMEOUT)

    def _body_timeout(self) -> None:
        err = SidecarError("upstream_timeout", f"{self.pool.label} did not finish in time")
        self._fail(err, None)  # the answer has started: the client is cut off

    def _fail(self, err: SidecarError, cause: str | None) -> None:
        """Give the connection up and tell the exchange (it may retry elsewhere)."""
        ex, down = self.ex, self.down
        self._unbind()
        self._gen += 1  # whatever the parser still reports is not for anyone
        self.abort()
        if ex is not None and down is not None:
            down.upstream_failed(ex, err, cause)

    def pause_writing(self) -> None:
        """The upstream reads slower than the client sends: stop reading the client."""
        self.write_paused = True
        if self.down is not None:
            self.down.pause_reading()
            self._paused_down = self.down

    def resume_writing(self) -> None:
        """The upstream caught up."""
        self.write_paused = False
        down, self._paused_down = self._paused_down, None
        if down is not None:
            down.resume_reading()

    # -- the response ----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Feed the response parser; writes downstream go out as one."""
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
            if self._switching:
                self._switch(b"")
        except httptools.HttpParserUpgrade as e:
            if self._switching:
                self._switch(data[e.args[0] :])
            else:  # an upgrade the request did not ask for: the answer is broken
                self._fail(
                    SidecarError("bad_upstream_response", f"{self.pool.label} switched protocols"),
                    None,
                )
        except httptools.HttpParserCallbackError:
            # A fault of ours while handling the answer, not the upstream's: not counted
            # against the endpoint; the exchange ends with a 500 (or the client is cut off).
            log.exception("handling the answer of %s failed", self.pool.label)
            self._fail(SidecarError("internal", "internal error"), None)
        except httptools.HttpParserError:
            if self.endpoint is not None:
                self.pool.failed(self.endpoint)
            self._fail(
                SidecarError(
                    "bad_upstream_response", f"{self.pool.label} sent a malformed response"
                ),
                None,
            )
        finally:
            if corked is not None:
                corked.uncork()

    def _switch(self, rest: bytes) -> None:
        """The upstream switched protocols: the connection leaves the pool and the
        downstream joins it with the client (`rest`: bytes that followed the 101)."""
        ex, down, transport = self.ex, self.down, self.transport
        self._switching = False
        self._unbind()
        self._disarm()
        DEADLINES.discard(self)
        self.pool.discard(self)
        self.transport = None  # the pipe owns it now
        if ex is None or down is None or transport is None:
            if transport is not None:
                transport.abort()
            return
        down.upgraded(ex, self._headers, transport, rest)

    def connection_lost(self, exc: Exception | None) -> None:
        """Retry, complete a close-delimited answer, or fail the exchange (502); then let go
        of the parser, whose callbacks are bound to this object: without that cycle the
        connection (and its transport's buffers) is freed at once, not at the next full
        garbage collection."""
        try:
            self._lost()
        finally:
            self.parser = _NO_PARSER
            self._parser_clean = False

    def _lost(self) -> None:
        self._disarm()
        DEADLINES.discard(self)
        self.pool.discard(self)
        ex, down = self.ex, self.down
        if ex is None or down is None:
            return
        if (
            not self._got_bytes
            and self.requests > 1
            and self.pool.retry.after_stale_connection(ex.method, ex.has_body, ex.retried)
        ):
            # A kept-alive connection the app closed while idle, or after it took the
            # request, without a byte of an answer.
            self._unbind()
            down.retry(ex)
            return
        if self._head_done and self._framing.kind is Kind.CLOSE:
            self.response_complete = True
            self.keep_alive = False
            down.response_done(ex)
            return
        if self.endpoint is not None and not self._head_done:
            self.pool.failed(self.endpoint)
        self._unbind()
        down.upstream_failed(
            ex,
            SidecarError("upstream_reset", f"{self.pool.label} closed the connection"),
            None if self._head_done else RESET,
        )

    # parser callbacks
    def on_message_begin(self) -> None:
        self._parser_clean = False

    def on_status(self, reason: bytes) -> None:
        if self._feeding == self._gen:
            self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._feeding == self._gen:
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._feeding != self._gen:
            return
        self._disarm()
        ex, down = self.ex, self.down
        status = self.parser.get_status_code()
        if ex is None or down is None:
            return
        if status == 101 and ex.upgrade:
            if self.endpoint is not None:
                self.pool.answered(self.endpoint, status)
            self._switching = True  # llhttp stops after this head; data_received switches
            return
        if status < 200:  # interim (100, 103): not forwarded; wait for the final answer
            self._headers, self._reason = [], b""
            return
        if self.endpoint is not None:
            self.pool.answered(self.endpoint, status)
        if status >= 500 and down.retry_status(ex, status):
            # Dropped: the request went elsewhere; this connection's answer is unread.
            self._unbind()
            self._gen += 1
            self.abort()
            return
        self._head_done = True
        self.keep_alive = self.parser.should_keep_alive()
        head_request = ex.method == b"HEAD"
        framing = response_framing(self._headers, status, head_request)
        if head_request:
            headers = [(k, v) for k, v in self._headers if k != b"content-length"]
            down.response_head(ex, status, self._reason, strip_hop_by_hop(headers), framing)
            # No body follows a HEAD answer, whatever it says: the exchange is over.
            self._framing = NO_BODY
            self.response_complete = True
            down.response_done(ex)
            return
        self._framing = framing
        if framing.kind is Kind.CLOSE:
            self.keep_alive = False
        if ex.deadline_at and framing.has_body:  # the whole request's time covers the body
            self.deadline = ex.deadline_at
            self.on_deadline = self._body_timeout
        down.response_head(ex, status, self._reason, self._headers, framing)

    def on_body(self, body: bytes) -> None:
        if self.ex is not None and self.down is not None and self._feeding == self._gen:
            self.down.response_body(self.ex, body)

    def on_message_complete(self) -> None:
        self._parser_clean = True
        ex, down = self.ex, self.down
        if ex is None or down is None or not self._head_done or ex.finished:
            return
        if self._feeding != self._gen:
            return
        self.response_complete = True
        down.response_done(ex)
