"""The HTTP/2 server side: one client connection, each of its streams an exchange.

The `h2` library does the protocol (frames, HPACK, flow-control accounting,
stream states); this module drives it like llhttp drives the HTTP/1.1 engine:
bytes in, events out, one write per read. Every stream becomes an `Exchange`
the router decides on exactly as an HTTP/1.1 request (`:authority` is the
`Host`, `:path` the target), so JWT authentication, policy, header integrity,
routes, retries, timeouts and the access log are the same. Streams run
concurrently; each one's answer goes back within the client's window, and an
upstream is paused while a stream holds more than `flow.HIGH` bytes for a slow
client (every stream's, while the connection holds more than `flow.CONN_HIGH`), so
a long server stream never sits here.

A gRPC call (`content-type: application/grpc...`) the sidecar refuses gets what a
gRPC client understands: HTTP 200 with `grpc-status` and `grpc-message` only (16
UNAUTHENTICATED, 7 PERMISSION_DENIED, 14 UNAVAILABLE, 4 DEADLINE_EXCEEDED, ...;
`errors.grpc_status`). `grpc-timeout` bounds the call's time here as well.
Trailers are passed through. Server push is off; `CONNECT` (RFC 8441 WebSocket
over HTTP/2) is refused, and so is a `:method` that is not a token or a `:path` that
is not origin form (or `*` for OPTIONS): the app reads them in an HTTP/1.1 request
line. `h2` refuses the rest of what RFC 9113 calls malformed.

A client that does not read its socket is not read either (its PINGs and SETTINGS
are answered into a full buffer otherwise); one that opens streams and resets them at
once (CVE-2023-44487) is told to go away, as Envoy does. A drain sends GOAWAY, lets
the streams opened so far finish and refuses newer ones (REFUSED_STREAM: retryable).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from sidecar.engines.base import DEADLINES, ConnGroup, Limits, refuse_connection
from sidecar.engines.h2.flow import (
    CONN_HIGH,
    HIGH,
    MAX_STREAMS,
    WINDOW,
    Held,
    Outbox,
    cap_encoder,
    connection,
    response_fields,
    split_fields,
)
from sidecar.engines.http1.exchange import Exchange
from sidecar.engines.http1.framing import (
    CHUNKED,
    NO_BODY,
    Framing,
    Headers,
    Kind,
    check_request_line,
    strip_hop_by_hop,
)
from sidecar.engines.http1.router import RouteLater, Router
from sidecar.errors import SidecarError, grpc_status
from sidecar.identity.peer import LOCAL_APP, Peer
from sidecar.telemetry.record import ExchangeRecord
from sidecar.upstream.endpoint import Endpoint
from sidecar.upstream.retry import CONNECT_FAILURE

log = logging.getLogger("sidecar.proxy")

PEER_FAILURES = frozenset({"peer_verification_failed", "peer_identity_mismatch", "peer_revoked"})
_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# Rapid reset (CVE-2023-44487): a stream opened and reset at once costs the client two
# frames and us a route and an upstream stream (or a dial). As Envoy does
# (overload.premature_reset_*), once a connection has opened RESET_FLOOR streams and
# half of them were reset by the client within PREMATURE_S of opening, it gets GOAWAY
# ENHANCE_YOUR_CALM and is closed; a client that cancels some calls is never near that.
RESET_FLOOR = 100
PREMATURE_S = 1.0


def grpc_timeout(value: bytes | None) -> float | None:
    """Seconds from a `grpc-timeout` value (`100m`, `5S`: at most 8 digits and a unit)."""
    if not value or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _GRPC_UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


class H2Downstream(asyncio.Protocol):
    """A client connection speaking HTTP/2: many exchanges at once, one per stream."""

    def __init__(
        self,
        router: Router,
        limits: Limits,
        access_log: Any = None,
        group: ConnGroup | None = None,
    ) -> None:
        self.router = router
        self.limits = limits
        self.access_log = access_log
        self.group = group
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=True,
            # What we send was built here from checked input (response_fields): h2's own
            # pass over it cost about a fifth of a call's CPU.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = connection(config)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.peer: Peer = LOCAL_APP
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.draining = False
        self.writing_paused = False
        self.deadline = 0.0
        self.on_deadline: Callable[[], None] | None = None
        self._corked = 0
        self.goaway_at: int | None = None  # the last stream id our drain's GOAWAY named
        self.opened = 0  # streams the client opened
        self.premature = 0  # ... and reset within PREMATURE_S
        self.held = Held()  # what the streams hold for the client
        self.blocked: dict[H2Stream, None] = {}  # streams with data waiting for a window
        self._opened: set[int] = set()  # windows this read opened (0: the connection's)
        self.choked = False  # over CONN_HIGH (until back to half): every upstream paused

    # -- connection ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Check the peer (router), then send our settings."""
        self.transport = transport  # type: ignore[assignment]
        DEADLINES.add(self)
        if self.group is not None:
            self.group.add(self)
            self.draining = self.group.draining
        try:
            self.peer = self.router.accept(self)
        except SidecarError as e:
            refuse_connection(self.router.direction, self.access_log, transport, e.code, e.detail)
            self.closed = True
            return
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_bytes,
            },
        )
        # h2 takes these settings as in force already, so its HPACK decoder would keep its
        # own 64 KiB bound: ours, with room for a list just over it to get 431 on its
        # stream (past twice the limit, the connection is closed: ENHANCE_YOUR_CALM).
        self.h2.decoder.max_header_list_size = 2 * self.limits.max_header_bytes
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(WINDOW)
        self.flush()
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        """Every stream still open is abandoned (its upstream cancelled)."""
        self.closed = True
        self.on_deadline = None
        DEADLINES.discard(self)
        if self.group is not None:
            self.group.discard(self)
        self.router.release(self)
        for st in list(self.streams.values()):
            st.client_gone()
        self.streams.clear()

    def drain(self) -> None:
        """Shutting down: GOAWAY (no new streams), close once the open ones are done."""
        self.draining = True
        if self.closed or self.transport is None or self.goaway_at is not None:
            return
        if not self.streams:
            self._close(h2.errors.ErrorCodes.NO_ERROR)
            return
        # Written past h2: once h2 has sent a GOAWAY it sends nothing more, so the open
        # streams could not finish (python-hyper/h2#1181). Newer ones are refused here.
        self.goaway_at = self.h2.highest_inbound_stream_id
        self.flush()
        self.transport.write(GoAwayFrame(0, last_stream_id=self.goaway_at).serialize())

    def pause_writing(self) -> None:
        """The client's socket is full: hold every stream's data, and stop reading the
        client (else a client that never reads has every PING and SETTINGS it sends
        answered into this buffer: CVE-2019-9512, 9515)."""
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The client caught up: send what the windows allow."""
        self.writing_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        self.cork()
        for st in list(self.streams.values()):
            st.flush_out()
        self.uncork()

    # -- input ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Feed HTTP/2; each event goes to its stream; what that queued goes out as one write."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # closed for a protocol error (or rapid reset): nothing more is acted on
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.info("%s: HTTP/2 protocol error from the client: %s", self.router.direction, e)
            self._close()  # with the GOAWAY h2 queued
            return
        self.cork()
        try:
            for ev in events:
                if transport.is_closing():
                    break
                self._event(ev)
            self._send_unblocked()
        finally:
            self.uncork()

    def _event(self, ev: Any) -> None:
        streams = self.streams
        if isinstance(ev, h2.events.RequestReceived):
            self._request(ev.stream_id, ev.headers or [], ev.stream_ended is not None)
        elif isinstance(ev, h2.events.DataReceived):
            st = streams.get(ev.stream_id)
            if st is not None:
                st.on_data(ev.data or b"", ev.flow_controlled_length or 0)
            else:
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            st = streams.get(ev.stream_id)
            if st is not None:
                st.on_end()
        elif isinstance(ev, h2.events.StreamReset):
            st = streams.get(ev.stream_id)
            if st is not None:
                st.client_gone()
                self.stream_done(st)  # (the last one gone: the idle timeout, or the drain's end)
                if self.loop.time() - st.opened_at < PREMATURE_S:
                    self.premature += 1
                    if self.opened >= RESET_FLOOR and 2 * self.premature >= self.opened:
                        log.warning(
                            "%s: %d of %d streams reset at once: GOAWAY (rapid reset)",
                            self.router.direction,
                            self.premature,
                            self.opened,
                        )
                        self._close(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        elif isinstance(ev, h2.events.WindowUpdated):
            self._opened.add(ev.stream_id or 0)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            cap_encoder(self.h2)
            self._opened.add(0)  # (a new initial window size changes every stream's)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.draining = True  # (its open streams finish: flow.connection)
            if not streams:
                self._close()

    def _send_unblocked(self) -> None:
        """Send what the windows this read opened allow: the streams waiting for one take
        turns until the connection's window is shut again. Once per read and only over
        those streams, so that a flood of WINDOW_UPDATEs (for the connection, or for closed
        streams) does not cost a pass over every stream each."""
        opened, self._opened = self._opened, set()
        if 0 in opened:
            waiting = list(self.blocked)
        else:
            waiting = [st for sid in opened if (st := self.streams.get(sid)) in self.blocked]
        for st in waiting:
            if self.h2.outbound_flow_control_window <= 0:
                break
            st.flush_out()

    def _request(self, sid: int, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        if self.goaway_at is not None and sid > self.goaway_at:
            # Opened after our GOAWAY: never processed, so the client may retry it.
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self.opened += 1
        pseudo, headers = split_fields(fields)
        size = sum(len(k) + len(v) + 32 for k, v in fields)
        method = pseudo.get(b":method", b"")
        grpc = any(k == b"content-type" and v.startswith(b"application/grpc") for k, v in headers)
        authority = pseudo.get(b":authority")
        cookies = [v for k, v in headers if k == b"cookie"]
        if len(cookies) > 1:  # RFC 9113 8.2.3: one field for HTTP/1.1
            headers = [(k, v) for k, v in headers if k != b"cookie"]
            headers.append((b"cookie", b"; ".join(cookies)))
        if authority is not None and not any(k == b"host" for k, _ in headers):
            headers.insert(0, (b"host", authority))
        length = None
        for k, v in headers:
            if k == b"content-length" and v.isdigit():
                length = int(v)
        framing = (
            NO_BODY if ended else (Framing(Kind.LENGTH, length) if length is not None else CHUNKED)
        )
        target = pseudo.get(b":path", b"")
        ex = Exchange(
            method=method,
            target=target,
            headers=headers,
            version="2",
            keep_alive=True,
            record=ExchangeRecord(self.router.direction, peer=self.peer.spiffe_id),
            framing=framing,
            body_done=ended,
        )
        ex.record.protocol = "grpc" if grpc else "HTTP/2"
        st = H2Stream(self, sid, ex, grpc)
        self.streams[sid] = st
        self.on_deadline = None  # busy: no idle timeout
        if size > self.limits.max_header_bytes:
            st.finish_with_error(
                SidecarError("headers_too_large", "request head is over the limit")
            )
        elif method == b"CONNECT":
            st.finish_with_error(
                SidecarError("method_not_allowed", "CONNECT over HTTP/2 is not supported")
            )
        elif (bad := _bad_line(method, target, authority)) is not None:
            st.finish_with_error(bad)
        elif (
            self.limits.max_body_bytes is not None
            and length is not None
            and length > self.limits.max_body_bytes
        ):
            st.finish_with_error(
                SidecarError(
                    "too_large", f"request body is over the {self.limits.max_body_bytes}-byte limit"
                )
            )
        else:
            st.activate()

    # -- output ----------------------------------------------------------------

    def cork(self) -> None:
        """Collect what the streams queue until `uncork` (one write)."""
        self._corked += 1

    def uncork(self) -> None:
        """Write what was collected."""
        self._corked -= 1
        if self._corked <= 0:
            self._corked = 0
            self.flush()

    def flush(self) -> None:
        """Write what the protocol state has queued (unless corked)."""
        if self._corked:
            return
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def stream_done(self, st: H2Stream) -> None:
        """A stream is over: forget it; close when draining and nothing is left."""
        if self.streams.get(st.sid) is st:
            del self.streams[st.sid]
        if not self.streams and not self.closed:
            if self.draining:
                self._close(h2.errors.ErrorCodes.NO_ERROR)
            else:
                self._idle()

    def _close(self, code: int | None = None) -> None:
        """GOAWAY with `code` (None: h2 queued one already), then close. What h2 holds
        is written even while corked: the transport closes before an uncork would."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if code is not None:  # (never a last stream id above the drain's: RFC 9113 6.8)
            self.h2.close_connection(code, last_stream_id=self.goaway_at)
        data = self.h2.data_to_send()
        if data:
            transport.write(data)
        transport.close()

    def check_held(self) -> None:
        """When what the streams hold together crosses CONN_HIGH (or falls back to half of
        it), every stream's upstream is paused (or may go on), not only the next to send."""
        size = self.held.size
        if not self.choked and size > CONN_HIGH:
            self.choked = True
        elif self.choked and size <= CONN_HIGH // 2:
            self.choked = False
        else:
            return
        if not self.closed:
            for st in list(self.streams.values()):
                st.pace()

    def _idle(self) -> None:
        self.deadline = self.loop.time() + self.limits.idle_timeout
        self.on_deadline = self._idle_timeout

    def _idle_timeout(self) -> None:
        if not self.streams and not self.closed:
            self._close(h2.errors.ErrorCodes.NO_ERROR)


class H2Stream:
    """One stream: its exchange, driven like the HTTP/1.1 engine drives one, and the
    `ResponseSink` its upstream reports to."""

    def __init__(self, conn: H2Downstream, sid: int, ex: Exchange, grpc: bool) -> None:
        self.conn = conn
        self.sid = sid
        self.ex = ex
        self.grpc = grpc
        self.loop = conn.loop
        self.out = Outbox(conn.h2, sid, conn.held)
        self.closed = False  # the client reset the stream, or the connection is gone
        self.peer = conn.peer
        self.transport = conn.transport  # what routers read (TLS details, the socket)
        self._unacked = 0  # request body bytes taken but not yet acknowledged
        self._held = False  # the upstream is full: stop reopening the client's window
        self._paused_up: Any = None  # the upstream paused because this stream holds too much
        self._head: list[tuple[bytes, bytes]] | None = None  # the answer's head, not yet sent
        self.opened_at = conn.loop.time()

    # -- the request ------------------------------------------------------------

    def activate(self) -> None:
        """Route, admit, and send the request on (after any injected delay)."""
        ex = self.ex
        if self.grpc:
            t = grpc_timeout(_header(ex.headers, b"grpc-timeout"))
            if t is not None:
                ex.deadline_at = self.loop.time() + t
        try:
            ex.pool, ex.head = pool, _ = self.conn.router.route(self, ex)
        except SidecarError as e:
            self.finish_with_error(e)
            return
        except RouteLater as later:
            if ex.rerouted:
                self.finish_with_error(SidecarError("internal", "internal error"))
            else:
                self.loop.create_task(self._route_later(later))
            return
        if not pool.admit():
            self.finish_with_error(
                SidecarError("overloaded", f"{pool.label}: too many requests in flight")
            )
            return
        ex.admitted = True
        if ex.delay:
            self.loop.call_later(ex.delay, self._after_delay)
        else:
            self._dispatch()

    async def _route_later(self, later: RouteLater) -> None:
        try:
            await later.wait()
        except Exception:
            log.exception("waiting to route failed")
        self.ex.rerouted = True
        if not self.closed and not self.ex.finished:
            self.activate()

    def _after_delay(self) -> None:
        if not self.closed and not self.ex.finished:
            self._dispatch()

    def _dispatch(self) -> None:
        ex = self.ex
        pool = ex.pool
        assert pool is not None
        if pool.timeout is not None:
            at = self.loop.time() + pool.timeout
            if not ex.deadline_at or at < ex.deadline_at:
                ex.deadline_at = at
        ep = pool.pick(ex.subset, ex.tried)
        if ep is None:
            where = f" (subset {ex.subset})" if ex.subset else ""
            self.finish_with_error(
                SidecarError(pool.unavailable, f"{pool.label} has no endpoints{where}")
            )
            return
        up = pool.take_idle(ep)
        if up is not None:
            self._send_on(up)
        else:
            self.loop.create_task(self._connect_and_send(ep))

    async def _connect_and_send(self, ep: Endpoint) -> None:
        ex = self.ex
        pool = ex.pool
        assert pool is not None
        try:
            up = await pool.connect(ep)
        except SidecarError as e:
            if e.code in PEER_FAILURES:
                pool.failed(ep)
                if self._may_retry(CONNECT_FAILURE, ep):
                    self._dispatch()
                    return
            self.finish_with_error(e)
            return
        except (OSError, TimeoutError) as e:
            log.warning("cannot connect to %s at %s: %s", pool.label, ep, e or type(e).__name__)
            pool.failed(ep)
            if self.closed or ex.finished:
                return
            if self._may_retry(CONNECT_FAILURE, ep):
                self._dispatch()
                return
            self.finish_with_error(
                SidecarError(pool.unavailable, f"{pool.label} is unavailable ({type(e).__name__})")
            )
            return
        if self.closed or ex.finished:
            pool.release(up)
            return
        self._send_on(up)

    def _send_on(self, up: Any) -> None:
        ex = self.ex
        pool = ex.pool
        assert pool is not None
        timeout = pool.per_try_timeout or self.conn.limits.upstream_timeout
        if ex.deadline_at:
            timeout = min(timeout, ex.deadline_at - self.loop.time())
            if timeout <= 0:
                pool.release(up)
                self.finish_with_error(
                    SidecarError("upstream_timeout", f"{pool.label} did not answer in time")
                )
                return
        unacked = ex.buffered
        up.send_request(ex, self, timeout)
        if up.write_paused or self._held:
            self._unacked += unacked  # acknowledged when the upstream drains (resume_reading)
        else:
            self._ack(unacked)

    def _may_retry(self, cause: str, ep: Endpoint | None) -> bool:
        if self.closed:
            return False
        return self.ex.may_retry(cause, ep, self.loop.time())

    def on_data(self, data: bytes, flow: int) -> None:
        """A piece of the request body: on to the upstream, or held until it is there."""
        ex = self.ex
        ex.bytes_in += len(data)
        limit = self.conn.limits.max_body_bytes
        if limit is not None and ex.bytes_in > limit:
            self.finish_with_error(
                SidecarError("too_large", f"request body is over the {limit}-byte limit")
            )
            self.conn.h2.acknowledge_received_data(flow, self.sid)
            return
        if ex.finished:
            self.conn.h2.acknowledge_received_data(flow, self.sid)
            return
        up = ex.upstream
        if up is not None:
            up.send_body(ex, data)
            if up.write_paused or self._held:
                self._unacked += flow
            else:
                self.conn.h2.acknowledge_received_data(flow, self.sid)
        else:
            ex.body.append(data)
            ex.buffered += flow  # acknowledged once sent (the window bounds what waits here)

    def on_end(self) -> None:
        """The request is complete."""
        ex = self.ex
        ex.body_done = True
        if ex.upstream is not None and not ex.finished:
            ex.upstream.end_request(ex)

    def _ack(self, n: int) -> None:
        if n and not self.closed:
            self.conn.h2.acknowledge_received_data(n, self.sid)

    # -- the ResponseSink ------------------------------------------------------------

    def pause_reading(self) -> None:
        """The upstream is full: stop reopening the client's window."""
        self._held = True

    def resume_reading(self) -> None:
        """The upstream caught up."""
        self._held = False
        n, self._unacked = self._unacked, 0
        self._ack(n)
        self.conn.flush()

    def cork(self) -> None:
        """One write for what one upstream read produces."""
        self.conn.cork()

    def uncork(self) -> None:
        """Write it (with the head, if nothing else came)."""
        self._send_head()
        self.conn.uncork()

    def response_head(
        self, ex: Exchange, status: int, reason: bytes, headers: Headers, framing: Framing
    ) -> None:
        """The answer's head: sent with what follows it in the same upstream read (a
        gRPC trailers-only answer must be one HEADERS frame that ends the stream)."""
        if self.closed:
            return
        ex.status = status
        ex.response_started = True
        headers = self.conn.router.response_headers(self, ex, strip_hop_by_hop(headers))
        self._head = response_fields(status, headers)
        if self.grpc:
            ex.record.grpc_status = _status(headers)  # a trailers-only answer has it here

    def _send_head(self, end: bool = False) -> None:
        head, self._head = self._head, None
        if head is not None and not self.closed:
            try:
                self.conn.h2.send_headers(self.sid, head, end_stream=end)
            except h2.exceptions.ProtocolError:
                # A head h2 refuses, or a connection failing (its close on the way): reset,
                # never raise into the upstream's read (it may serve other clients too).
                self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
                return
            if end:
                self.out.ended = True

    def response_body(self, ex: Exchange, data: bytes) -> None:
        """A piece of the answer: queued within the client's window."""
        if self.closed:
            return
        self._send_head()
        ex.bytes_out += len(data)
        self.out.push(data)
        self.flush_out()
        self.pace()  # (also when the client's socket is full, and flush_out sent nothing)

    def response_trailers(self, ex: Exchange, trailers: Headers) -> None:
        """Trailers (gRPC's status) end the stream after the data."""
        if not self.closed:
            self.out.trailers = [(k.lower(), v) for k, v in trailers]
            if self.grpc:
                ex.record.grpc_status = _status(trailers)

    def response_done(self, ex: Exchange) -> None:
        """The answer is complete upstream: end the stream once its data is out."""
        if not self.closed:
            if self._head is not None and not self.out.trailers:
                self._send_head(end=True)  # head only (trailers-only, for gRPC)
            else:
                self._send_head()
                self.out.finish(self.out.trailers)
                self.flush_out()
            self.conn.flush()
        self._complete()

    def flush_out(self) -> None:
        """Send what the windows allow; resume a paused upstream once drained."""
        if self.closed or self.conn.writing_paused:
            return
        out = self.out
        blocked = self.conn.blocked
        blocked.pop(self, None)
        try:
            out.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            out.drop()
            self.conn.check_held()
            return
        if out.chunks:
            blocked[self] = None  # waits for a window (behind the others waiting)
        self.pace()
        if out.ended and self.ex.finished:
            self._done()
        self.conn.flush()

    def pace(self) -> None:
        """Pause the upstream while this stream holds more than HIGH for the client, or the
        connection more than CONN_HIGH; let it go on once both are down to half."""
        conn = self.conn
        conn.check_held()
        up = self._paused_up
        if up is None:
            up = self.ex.upstream
            if up is not None and not self.ex.finished and (self.out.size > HIGH or conn.choked):
                self._paused_up = up
                up.pause_reading()
        elif self.out.size <= HIGH // 2 and not conn.choked:
            self._paused_up = None
            up.resume_reading()

    def upstream_failed(self, ex: Exchange, err: SidecarError, cause: str | None = None) -> None:
        """The upstream died or timed out: retry if allowed, else answer, else reset."""
        if ex.finished:
            return
        up = ex.upstream
        if cause is not None and not ex.response_started:
            ep = up.endpoint if up is not None else None
            if self._may_retry(cause, ep):
                ex.upstream = None
                self._dispatch()
                return
        if ex.response_started:
            if ex.record.error is None:
                ex.record.error = err.code
            self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            self._complete()
            return
        self.finish_with_error(err)

    def retry(self, ex: Exchange) -> None:
        """A kept-alive connection the app had closed: once more, on a new one."""
        ex.retried = True
        ex.upstream = None
        if self.closed or ex.finished:
            return
        pool = ex.pool
        assert pool is not None
        ep = pool.pick(ex.subset, ex.tried)
        if ep is None:
            self.finish_with_error(SidecarError(pool.unavailable, f"{pool.label} is gone"))
            return
        self.loop.create_task(self._connect_and_send(ep))

    def retry_status(self, ex: Exchange, status: int) -> bool:
        """An answer with a status the service retries on: drop it and try elsewhere."""
        pool = ex.pool
        up = ex.upstream
        if pool is None or up is None or ex.response_started:
            return False
        if not pool.retry.retries_status(status) or not self._may_retry(str(status), up.endpoint):
            return False
        ex.upstream = None
        self.loop.call_soon(self._redispatch)
        return True

    def _redispatch(self) -> None:
        if not self.closed and not self.ex.finished:
            self._dispatch()

    # -- endings -----------------------------------------------------------------------

    def finish_with_error(self, err: SidecarError) -> None:
        """Answer the stream ourselves: gRPC's trailers-only form for a gRPC call, else the
        JSON body every other refusal has."""
        ex = self.ex
        if ex.finished:
            return
        ex.status = err.status
        if ex.record.error is None:
            ex.record.error = err.code
        if not self.closed:
            h2c = self.conn.h2
            try:
                if self.grpc:
                    ex.status = 200
                    code = grpc_status(err)
                    ex.record.grpc_status = code
                    message = urllib.parse.quote(err.detail, safe=" !#$&'()*+,/:;=?@[]~")
                    fields = [
                        (b":status", b"200"),
                        (b"content-type", b"application/grpc"),
                        (b"grpc-status", b"%d" % code),
                        (b"grpc-message", message.encode("ascii")),
                    ]
                    h2c.send_headers(self.sid, fields, end_stream=True)
                    self.out.ended = True
                else:
                    body = json.dumps({"error": err.code, "detail": err.detail, **err.fields})
                    data = body.encode() + b"\n"
                    fields = [
                        (b":status", b"%d" % err.status),
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(data)),
                    ]
                    fields += [(k.lower(), v) for k, v in err.headers]
                    head_only = ex.method == b"HEAD"
                    h2c.send_headers(self.sid, fields, end_stream=head_only)
                    if head_only:
                        self.out.ended = True
                    else:  # as the client's window allows (flush_out ends the stream)
                        self.out.push(data)
                        self.out.finish()
                        self.flush_out()
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.out.ended = True
            self.conn.flush()
        else:
            self.out.ended = True
        self._complete()

    def _reset(self, code: int) -> None:
        if self.closed:
            return
        try:
            self.conn.h2.reset_stream(self.sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.out.ended = True
        self.conn.flush()

    def _complete(self) -> None:
        ex = self.ex
        if ex.finished:
            return
        ex.finished = True
        if ex.admitted:
            ex.admitted = False
            assert ex.pool is not None
            ex.pool.done(ex.retrying)
        self._record()
        up, self._paused_up = self._paused_up, None
        if up is not None:
            # It paused for this answer, which is all here now: an HTTP/1.1 connection
            # would go back to the pool paused, and its next exchange would hang.
            up.resume_reading()
        if ex.upstream is not None:
            ex.upstream.detach(ex)
        if self.out.ended or self.closed:
            self._done()

    def _done(self) -> None:
        """The answer is out (or cannot go): the request's unread rest is not wanted (RFC
        9113 8.1: RST_STREAM NO_ERROR), and the window it used is given back."""
        if not self.ex.body_done and not self.closed:
            self._reset(h2.errors.ErrorCodes.NO_ERROR)
        self._give_back()
        self.out.drop()  # (nothing, unless sending failed)
        self.conn.blocked.pop(self, None)
        self.conn.stream_done(self)
        self.conn.check_held()

    def _give_back(self) -> None:
        """Acknowledge the request body taken and not acknowledged yet: the connection's
        window is shared by every stream and would shrink for good (a few streams reset
        while their upload waited would stall the whole connection)."""
        ex = self.ex
        n, self._unacked = self._unacked + ex.buffered, 0
        ex.buffered = 0
        ex.body.clear()
        if n and not self.conn.closed:
            self.conn.h2.acknowledge_received_data(n, self.sid)  # (the connection's part only,
            # once the stream is closed)

    def client_gone(self) -> None:
        """The client reset the stream or closed the connection."""
        self.closed = True
        self._give_back()
        self.out.drop()
        self.conn.blocked.pop(self, None)
        self.conn.check_held()
        ex = self.ex
        if ex.finished:
            return
        if ex.upstream is not None:
            ex.upstream.cancel()
        ex.finished = True
        if ex.admitted:
            ex.admitted = False
            assert ex.pool is not None
            ex.pool.done(ex.retrying)
        ex.record.error = "client_disconnected"
        self._record()

    def _record(self) -> None:
        if self.conn.access_log is not None:
            self.conn.access_log.write(self.ex.finished_record())


def _status(fields: Headers) -> int | None:
    """gRPC's status code (0-16) from `grpc-status`; None for anything else (it becomes a
    metrics label: what a peer sends must not make new series)."""
    value = _header([(k.lower(), v) for k, v in fields], b"grpc-status")
    if value is None or not value.isdigit() or len(value) > 2:
        return None
    code = int(value)
    return code if code <= 16 else None


def _bad_line(method: bytes, target: bytes, authority: bytes | None) -> SidecarError | None:
    """What is wrong with the request line these pseudo-headers make (the app reads one)."""
    try:
        check_request_line(method, target, authority)
    except SidecarError as e:
        return e
    return None


def _header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None
