"""The HTTP/2 client side: one connection to the app (h2c) or to another sidecar (`meshca-h2`
over mTLS), carrying the streams of many exchanges at once.

The pool keeps a connection while it has room for streams (the peer's
`SETTINGS_MAX_CONCURRENT_STREAMS`) and hands out an `H2UpstreamStream` per
exchange. A stream offers the engines what an HTTP/1.1 `UpstreamConn` does
(`send_request`, `send_body`, `end_request`, `pause_reading`, `detach`, ...), so
either downstream engine can use either upstream protocol, and it reports back
through the same `ResponseSink`. Flow control is HTTP/2's own: data from the
peer is acknowledged (its window reopened) only once the client side took it
and is not paused, so a long server stream waits in the app, not here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from sidecar.engines.base import DEADLINES
from sidecar.engines.h2.flow import (
    HIGH,
    WINDOW,
    Outbox,
    cap_encoder,
    connection,
    h2_headers,
    split_fields,
)
from sidecar.engines.http1.framing import CHUNKED, NO_BODY, Framing, Headers, Kind
from sidecar.engines.http1.upstream import RESET, TIMEOUT, ResponseSink
from sidecar.errors import SidecarError
from sidecar.identity.peer import LOCAL_APP, Peer

if TYPE_CHECKING:
    from collections.abc import Callable

    from sidecar.engines.http1.exchange import Exchange
    from sidecar.upstream.endpoint import Endpoint
    from sidecar.upstream.pool import UpstreamPool

log = logging.getLogger("sidecar.proxy")

LAST_STREAM_ID = 2**31 - 1

_EVENTS_IGNORED = (
    h2.events.SettingsAcknowledged,
    h2.events.PingReceived,
    h2.events.PingAckReceived,
    h2.events.PriorityUpdated,
    h2.events.UnknownFrameReceived,
    h2.events.AlternativeServiceAvailable,
    h2.events.InformationalResponseReceived,
)


def response_framing(fields: Headers, status: int, head_request: bool, ended: bool) -> Framing:
    """How an HTTP/1.1 client would be told the body of this answer is delimited."""
    if ended or status in (204, 304):
        return NO_BODY
    for k, v in fields:
        if k == b"content-length":
            try:
                return Framing(Kind.LENGTH, int(v))
            except ValueError:
                break
    return NO_BODY if head_request else CHUNKED


class H2Upstream(asyncio.Protocol):
    """An HTTP/2 client connection; its streams serve exchanges."""

    def __init__(self, pool: UpstreamPool, scheme: bytes = b"https") -> None:
        self.pool = pool
        self.scheme = scheme
        self.endpoint: Endpoint | None = None  # set by the pool once connected
        self.transport: asyncio.Transport | None = None
        self.peer: Peer = LOCAL_APP  # outbound: the verified server
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            # What we send was built here from checked input (flow.h2_headers); what comes
            # back is checked.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = connection(config)  # (a GOAWAY received lets its streams finish)
        self.streams: dict[int, H2UpstreamStream] = {}
        self.goaway = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Connected (for TLS: handshaken): send the preface and our settings."""
        self.transport = transport  # type: ignore[assignment]
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(WINDOW)
        self.flush()

    def usable(self) -> bool:
        """Open, not going away, with a stream id left (2**30 of them: RFC 9113 5.1.1) and
        room for one more stream. One that will take no more is closed once it is idle."""
        t = self.transport
        if t is None or t.is_closing():
            return False
        if self.goaway or self.h2.highest_outbound_stream_id + 2 > LAST_STREAM_ID:
            if not self.streams:
                t.close()  # (else it would stay open, and counted by the pool, for nothing)
            return False
        return self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams

    def open_stream(self) -> H2UpstreamStream:
        """A new stream for one exchange (its headers go out with `send_request`)."""
        return H2UpstreamStream(self, self.h2.get_next_available_stream_id())

    def abort(self) -> None:
        """Drop the connection and every stream on it."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def write_paused(self) -> bool:
        """Never: HTTP/2 bounds what is buffered per stream."""
        return False

    def flush(self) -> None:
        """Write what the protocol state has queued."""
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        """Feed HTTP/2 and hand each event to its stream."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.warning("%s: HTTP/2 protocol error: %s", self.pool.label, e)
            if self.endpoint is not None:
                self.pool.failed(self.endpoint)
            self.flush()
            self.abort()
            return
        streams = self.streams
        opened: set[int] = set()  # windows opened (0: the connection's): flushed once, after
        for ev in events:
            sid = getattr(ev, "stream_id", 0)
            st = streams.get(sid) if sid else None
            if isinstance(ev, h2.events.DataReceived):
                if st is not None:
                    st.on_data(ev.data or b"", ev.flow_controlled_length or 0)
                else:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
            elif isinstance(ev, h2.events.ResponseReceived):
                if st is not None:
                    st.on_response(ev.headers or [], ev.stream_ended is not None)
            elif isinstance(ev, h2.events.TrailersReceived):
                if st is not None:
                    st.on_trailers(ev.headers or [])
            elif isinstance(ev, h2.events.StreamEnded):
                if st is not None:
                    st.on_end()
            elif isinstance(ev, h2.events.StreamReset):
                if st is not None:
                    st.on_reset(ev.error_code)
            elif isinstance(ev, h2.events.WindowUpdated):
                opened.add(sid)
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                cap_encoder(self.h2)
                opened.add(0)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = True
                last = ev.last_stream_id or 0
                for t in [t for t in streams.values() if t.sid > last]:
                    t.on_reset(h2.errors.ErrorCodes.REFUSED_STREAM)  # never processed
        if opened:  # (a flood of WINDOW_UPDATEs costs one pass, not one per frame)
            ids = list(streams) if 0 in opened else opened
            for waiting in [streams[i] for i in ids if i in streams]:
                waiting.flush_out()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        """Every stream still open fails (a reset: it may be retried)."""
        self.pool.discard(self)
        for st in list(self.streams.values()):
            st.on_lost()
        self.streams.clear()


class H2UpstreamStream:
    """One exchange's stream on an `H2Upstream`: what the engines call an upstream."""

    __slots__ = (
        "conn",
        "sid",
        "endpoint",
        "ex",
        "down",
        "out",
        "deadline",
        "on_deadline",
        "write_paused",
        "_held",
        "_unacked",
        "_head_done",
        "_timeout_s",
        "_grpc",
        "complete",
    )

    def __init__(self, conn: H2Upstream, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.endpoint = conn.endpoint
        self.ex: Exchange | None = None
        self.down: ResponseSink | None = None
        self.out = Outbox(conn.h2, sid)
        self.deadline = 0.0
        self.on_deadline: Callable[[], None] | None = None
        self.write_paused = False  # more request body is held than HIGH
        self._held = False  # the client side asked us to stop reading
        self._unacked = 0
        self._head_done = False
        self._timeout_s = 0.0
        self._grpc = False
        self.complete = False  # both directions ended

    @property
    def transport(self) -> asyncio.Transport | None:
        """The connection's transport."""
        return self.conn.transport

    @property
    def peer(self) -> Peer:
        """The verified server."""
        return self.conn.peer

    # -- what the downstream side calls -------------------------------------

    def send_request(self, ex: Exchange, down: ResponseSink, response_timeout: float) -> None:
        """Open the stream with the request's head, and send what body has arrived."""
        conn = self.conn
        self.ex, self.down = ex, down
        ex.upstream = self
        if self.endpoint is not None:
            self.endpoint.active += 1
        self._timeout_s = response_timeout
        fields, self._grpc = h2_headers(ex.head, ex.framing, conn.scheme)
        conn.streams[self.sid] = self
        DEADLINES.add(self)
        try:
            conn.h2.send_headers(self.sid, fields, end_stream=ex.body_done and not ex.body)
        except h2.exceptions.ProtocolError as e:
            # The peer's limits changed under us (it lowered its stream limit): not its fault.
            conn.streams.pop(self.sid, None)
            self._unbind()
            down.upstream_failed(ex, SidecarError("upstream_reset", str(e)), RESET)
            return
        if ex.body_done and not ex.body:
            self.out.ended = True
            self._arm_response()
        else:
            for piece in ex.body:
                self.out.push(piece)
            ex.body.clear()
            ex.buffered = 0
            if ex.body_done:
                self.out.finish()
                self._arm_response()
            self.flush_out()
        conn.flush()

    def send_body(self, ex: Exchange, data: bytes) -> None:
        """A piece of the request body."""
        self.out.push(data)
        self.flush_out()
        self.conn.flush()

    def end_request(self, ex: Exchange) -> None:
        """The request is complete: end the stream once its data is out; the answer is due."""
        self.out.finish()
        self.flush_out()
        self.conn.flush()
        if not self._head_done:
            self._arm_response()

    def _arm_response(self) -> None:
        self.deadline = asyncio.get_running_loop().time() + self._timeout_s
        self.on_deadline = self._timeout

    def flush_out(self) -> None:
        """Send what the window allows; tell the client side to pause or resume."""
        out = self.out
        if self.conn.transport is None or out.ended and not out.chunks:
            return
        try:
            out.flush()
        except h2.exceptions.ProtocolError:  # the stream is closed, or the connection failing:
            out.drop()  # never raise into the client's read
            return
        down = self.down
        if out.size > HIGH and not self.write_paused:
            self.write_paused = True
            if down is not None:
                down.pause_reading()
        elif self.write_paused and out.size <= HIGH // 2:
            self.write_paused = False
            if down is not None:
                down.resume_reading()

    def pause_reading(self) -> None:
        """The client reads slower than the peer sends: stop reopening the window."""
        self._held = True

    def resume_reading(self) -> None:
        """The client caught up: reopen the window for what it took."""
        self._held = False
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self.conn.h2.acknowledge_received_data(n, self.sid)
            self.conn.flush()

    def detach(self, ex: Exchange) -> None:
        """The exchange is over; a stream not finished both ways is cancelled."""
        if self.ex is not ex:
            return
        self._unbind()
        if not self.complete:
            self._reset(h2.errors.ErrorCodes.CANCEL)

    def cancel(self) -> None:
        """The client is gone: cancel the stream (not counted against the endpoint)."""
        self._unbind()
        self._reset(h2.errors.ErrorCodes.CANCEL)

    def abort(self) -> None:
        """Cancel the stream (the connection and its other streams stay)."""
        self._unbind()
        self._reset(h2.errors.ErrorCodes.CANCEL)

    # -- events from the connection ------------------------------------------

    def on_response(self, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        ex, down = self.ex, self.down
        pseudo, headers = split_fields(fields)
        try:
            status = int(pseudo.get(b":status", b"0"))
        except ValueError:
            status = 0
        if ex is None or down is None:
            return
        if status < 200:
            return
        self.on_deadline = None
        if self.endpoint is not None:
            self.conn.pool.answered(self.endpoint, status)
        if status >= 500 and down.retry_status(ex, status):
            self._unbind()
            self._reset(h2.errors.ErrorCodes.CANCEL)
            return
        self._head_done = True
        framing = response_framing(headers, status, ex.method == b"HEAD", ended)
        if ex.deadline_at and not ended:  # the request's whole time covers the body
            self.deadline = ex.deadline_at
            self.on_deadline = self._body_timeout
        down.cork()  # the head goes out with what follows it in this read (or alone after)
        try:
            down.response_head(ex, status, b"", headers, framing)
        finally:
            if not ended:
                down.uncork()
        if ended:  # the answer was its head only (gRPC's trailers-only)
            self.on_end()
            down.uncork()

    def on_data(self, data: bytes, flow: int) -> None:
        ex, down = self.ex, self.down
        if ex is None or down is None or not self._head_done:
            self.conn.h2.acknowledge_received_data(flow, self.sid)
            return
        down.cork()
        try:
            down.response_body(ex, data)
        finally:
            down.uncork()
        if self._held or self.ex is not ex:
            self._unacked += flow
        else:
            self.conn.h2.acknowledge_received_data(flow, self.sid)

    def on_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        ex, down = self.ex, self.down
        if ex is not None and down is not None and self._head_done:
            down.response_trailers(ex, [(k, v) for k, v in fields if k[:1] != b":"])

    def on_end(self) -> None:
        self.conn.streams.pop(self.sid, None)
        DEADLINES.discard(self)
        self.on_deadline = None
        self.complete = self.out.ended
        ex, down = self.ex, self.down
        if ex is None or down is None:
            return
        if not self._head_done:
            self._fail(
                SidecarError("bad_upstream_response", "stream ended without an answer"), None
            )
            return
        if not self.out.ended:
            # The answer came before the whole request went: the rest is not wanted.
            self._reset(h2.errors.ErrorCodes.NO_ERROR)
            self.complete = True
        down.response_done(ex)

    def on_reset(self, code: int | None) -> None:
        self.conn.streams.pop(self.sid, None)
        self.complete = True
        refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
        if self.endpoint is not None and not self._head_done and not refused:
            self.conn.pool.failed(self.endpoint)
        what = "refused the stream" if refused else f"reset the stream ({code})"
        self._fail(
            SidecarError("upstream_reset", f"{self.conn.pool.label} {what}"),
            None if self._head_done else RESET,
        )

    def on_lost(self) -> None:
        self.complete = True
        if self.endpoint is not None and not self._head_done:
            self.conn.pool.failed(self.endpoint)
        self._fail(
            SidecarError("upstream_reset", f"{self.conn.pool.label} closed the connection"),
            None if self._head_done else RESET,
        )

    # -- endings ----------------------------------------------------------------

    def _timeout(self) -> None:
        if self.endpoint is not None:
            self.conn.pool.failed(self.endpoint)
        self._reset(h2.errors.ErrorCodes.CANCEL)
        self._fail(
            SidecarError("upstream_timeout", f"{self.conn.pool.label} did not answer in time"),
            TIMEOUT,
        )

    def _body_timeout(self) -> None:
        self._reset(h2.errors.ErrorCodes.CANCEL)
        self._fail(
            SidecarError("upstream_timeout", f"{self.conn.pool.label} did not finish in time"),
            None,
        )

    def _fail(self, err: SidecarError, cause: str | None) -> None:
        ex, down = self.ex, self.down
        self._unbind()
        if ex is not None and down is not None:
            down.upstream_failed(ex, err, cause)

    def _reset(self, code: int) -> None:
        conn = self.conn
        conn.streams.pop(self.sid, None)
        self.complete = True
        if conn.transport is None or conn.transport.is_closing():
            return
        try:
            conn.h2.reset_stream(self.sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        conn.flush()

    def _unbind(self) -> None:
        DEADLINES.discard(self)
        self.on_deadline = None
        if self.ex is not None and self.endpoint is not None:
            self.endpoint.active -= 1
        self.ex, self.down = None, None
        # Nobody will resume this stream now: acknowledge what it held back, or the
        # connection's window (shared by every stream on it) shrinks for good.
        self._held = False
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self.conn.h2.acknowledge_received_data(n, self.sid)
            self.conn.flush()
