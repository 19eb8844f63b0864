"""The HTTP/2 engine as an attacker and a sloppy client see it: a real `h2` client (and,
for the upstream side, a real `h2` server) over in-memory transports, no sockets.

The client's bytes go into `H2Downstream.data_received`; what the engine writes is fed
back into the client's own state machine, so every assertion is about what a client
observes (status, grpc-status, RST_STREAM and GOAWAY codes, windows) or about what the
upstream received (a fake that records send_request, send_body, end_request, cancel).
The pool is the real `UpstreamPool` (its admitted count is checked) with a fake dial.
Covered: routing and answers, refusals (JSON and gRPC), header limits and HPACK bombs,
malformed heads, flow control both ways, resets (and rapid reset, CVE-2023-44487),
the connection's end, drain and idle timeout, and `H2Upstream` against an h2 server.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import urllib.parse
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hyperframe.frame import GoAwayFrame

from sidecar.engines.base import DEADLINES, ConnGroup, Limits
from sidecar.engines.h2.downstream import RESET_FLOOR, H2Downstream, H2Stream
from sidecar.engines.h2.flow import CONN_HIGH, ENCODER_TABLE, HIGH, WINDOW, connection
from sidecar.engines.h2.upstream import H2Upstream
from sidecar.engines.http1.exchange import Exchange
from sidecar.engines.http1.framing import CHUNKED, NO_BODY, Kind
from sidecar.engines.http1.router import Router
from sidecar.errors import SidecarError, grpc_status
from sidecar.telemetry.record import ExchangeRecord
from sidecar.upstream.pool import UpstreamPool

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM

# -- fakes ------------------------------------------------------------------------------


class Wire:
    """One end of a connection as its protocol sees it: what was written and not yet
    read by the other end, closes, read pauses. Like an asyncio transport, it pauses the
    protocol's writing past `high_water` unread bytes (resumed once they are read), and
    tells the protocol of a close on the next loop iteration."""

    def __init__(self, protocol: asyncio.Protocol, high_water: int | None = None):
        self.protocol = protocol
        self.high_water = high_water
        self.unread = bytearray()
        self.written = 0
        self.closed = False
        self.aborted = False
        self.writing_paused = False
        self.reading: list[str] = []
        self.after_close = bytearray()
        self._lost = False
        protocol.connection_made(self)

    @property
    def reading_paused(self) -> bool:
        return bool(self.reading) and self.reading[-1] == "pause"

    def write(self, data: bytes) -> None:
        if self.closed:
            self.after_close += data
            return
        self.unread += data
        self.written += len(data)
        if self.high_water is not None and len(self.unread) > self.high_water:
            if not self.writing_paused:
                self.writing_paused = True
                self.protocol.pause_writing()

    def take(self) -> bytes:
        """The other end reads everything written so far."""
        data = bytes(self.unread)
        self.unread.clear()
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.lose)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def lose(self) -> None:
        """The connection is gone: the protocol hears it once."""
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


class Upstream:
    """What the engine calls an upstream (an `UpstreamConn` or an `H2UpstreamStream`):
    records what it was given; the test answers through the `ResponseSink` it got."""

    def __init__(self, app: App):
        self.app = app
        self.endpoint = None
        self.transport = self  # (the pool checks is_closing on an idle connection)
        self.write_paused = False
        self.pause_on_send = False  # full at once: pause the client as send_request returns
        self.ex: Exchange | None = None
        self.down = None
        self.head = b""
        self.body = bytearray()
        self.ended = False
        self.cancelled = False
        self.detached = False
        self.reading_paused = False
        self.pauses = 0
        self.resumes = 0

    def is_closing(self) -> bool:
        return self.cancelled

    def send_request(self, ex, down, response_timeout):
        self.ex, self.down = ex, down
        ex.upstream = self
        self.head = ex.head
        self.body = bytearray()
        self.ended = self.detached = False
        for piece in ex.body:
            self.body += piece
        ex.body.clear()
        ex.buffered = 0
        if ex.body_done:
            self.ended = True
        if self.pause_on_send:
            self.write_paused = True
            down.pause_reading()

    def send_body(self, ex, data):
        assert not self.ended, "body after the end of the request"
        self.body += data

    def end_request(self, ex):
        self.ended = True

    def pause_reading(self):
        self.reading_paused = True
        self.pauses += 1

    def resume_reading(self):
        self.reading_paused = False
        self.resumes += 1

    def detach(self, ex):
        self.detached = True

    def cancel(self):
        self.cancelled = True

    def abort(self):
        self.cancelled = True

    def unpause(self):
        """The app took what was written: the client may send again."""
        self.write_paused = False
        self.down.resume_reading()

    # -- answering, as an upstream does: one read, corked --

    def answer(self, status=200, headers=(), body=b"", trailers=None, done=True):
        down, ex = self.down, self.ex
        down.cork()
        down.response_head(ex, status, b"OK", list(headers), NO_BODY)
        if body:
            down.response_body(ex, body)
        if trailers is not None:
            down.response_trailers(ex, list(trailers))
        if done:
            down.response_done(ex)
        down.uncork()

    def send(self, data: bytes, done: bool = False):
        down, ex = self.down, self.ex
        down.cork()
        down.response_body(ex, data)
        if done:
            down.response_done(ex)
        down.uncork()


class App:
    """The pool's dial: each connection an `Upstream`; with `gate`, a dial waits for it."""

    def __init__(self, gate: asyncio.Event | None = None):
        self.gate = gate
        self.ups: list[Upstream] = []
        self.pause_on_send = False

    async def connect(self, pool, host, port):
        if self.gate is not None:
            await self.gate.wait()
        up = Upstream(self)
        up.pause_on_send = self.pause_on_send
        self.ups.append(up)
        return up


class AppRouter(Router):
    """Routes every stream to the app's pool (or refuses with `refuse`); records what it saw."""

    direction = "inbound"

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.refuse: SidecarError | None = None
        self.routed: list[Exchange] = []
        self.released = 0

    def route(self, conn, ex):
        self.routed.append(ex)
        if self.refuse is not None:
            raise self.refuse
        lines = [b"%s %s HTTP/1.1\r\n" % (ex.method, ex.target)]
        lines += [b"%s: %s\r\n" % (k, v) for k, v in ex.headers]
        return self.pool, b"".join(lines)

    def release(self, conn):
        self.released += 1


class AccessLog:
    def __init__(self):
        self.records: list[ExchangeRecord] = []

    def write(self, rec):
        self.records.append(rec)


@dataclass
class Answer:
    """One stream as the client saw it."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    ended: bool = False
    reset: int | None = None
    head_ended: bool = False  # END_STREAM came on the HEADERS frame (nothing else came)

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1
        return values[0] if values else None


class Client:
    """An HTTP/2 client (h2's state machine, validation off so it can misbehave) connected
    to an `H2Downstream` that routes to an `App` through a real pool."""

    def __init__(
        self,
        limits: Limits | None = None,
        app: App | None = None,
        acks: bool = True,
        high_water: int | None = None,
        group: ConnGroup | None = None,
        settings: dict | None = None,
    ):
        self.app = app or App()
        self.pool = UpstreamPool("app", [("127.0.0.1", 8080)], self.app.connect)
        self.router = AppRouter(self.pool)
        self.log = AccessLog()
        self.group = group
        self.acks = acks  # reopen the window for every DATA read (a well-behaved client)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = connection(config)  # (it reads on after a GOAWAY, as real clients do)
        # hpack's Huffman encoder is quadratic in a value's length (a 450 KB header takes
        # half a minute): literals only. The engine's decoder is the same either way.
        self.h2.encoder.encode = functools.partial(self.h2.encoder.encode, huffman=False)
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.conn = H2Downstream(self.router, limits or Limits(), self.log, group)
        self.wire = Wire(self.conn, high_water)
        self.answers: dict[int, Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.send()
        self.read()

    def send(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.wire.closed:
            self.conn.data_received(data)

    def read(self) -> None:
        """Read what the engine wrote; answer what h2 answers (settings, pings)."""
        for ev in self.h2.receive_data(self.wire.take()):
            sid = getattr(ev, "stream_id", None)
            if isinstance(ev, h2.events.ResponseReceived):
                a = self.answers.setdefault(sid, Answer())
                a.headers = list(ev.headers)
                a.status = int(dict(ev.headers)[b":status"])
                a.head_ended = ev.stream_ended is not None
            elif isinstance(ev, h2.events.DataReceived):
                self.answers.setdefault(sid, Answer()).data += ev.data
                if self.acks:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.answers.setdefault(sid, Answer()).trailers = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                self.answers.setdefault(sid, Answer()).ended = True
            elif isinstance(ev, h2.events.StreamReset):
                self.answers.setdefault(sid, Answer()).reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
        self.send()

    def fields(self, path=b"/", method=b"GET", authority=b"svc.local", extra=()):
        return [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", path),
            *extra,
        ]

    def request(self, path=b"/", method=b"GET", body=None, end=True, extra=(), fields=None):
        """Open a stream (headers, then `body` if any); `end` ends the request."""
        sid = self.h2.get_next_available_stream_id()
        fields = fields if fields is not None else self.fields(path, method, extra=extra)
        self.h2.send_headers(sid, fields, end_stream=end and body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=end)
        self.send()
        return sid

    def grpc(self, path=b"/pkg.Svc/Call", end=True):
        extra = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        return self.request(path, b"POST", b"\0\0\0\0\0" if end else None, end, extra)

    def upload(self, sid: int, data: bytes, end: bool = False) -> int:
        """Send as much of `data` as the windows allow; the number of bytes sent."""
        sent = 0
        while sent < len(data) and self.answers.get(sid, Answer()).reset is None:
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if room <= 0:
                break
            piece = data[sent : sent + room]
            sent += len(piece)
            self.h2.send_data(sid, piece, end_stream=end and sent == len(data))
            self.send()
            self.read()
        return sent

    def reset(self, sid: int, code=h2.errors.ErrorCodes.CANCEL) -> None:
        self.h2.reset_stream(sid, code)
        self.send()

    async def settle(self) -> None:
        await settle()
        self.read()

    def upstream(self, sid: int) -> Upstream:
        """The upstream that stream `sid` was sent on (a dial whose stream was gone meanwhile
        is reused by the next one)."""
        (up,) = [u for u in self.app.ups if u.down is not None and u.down.sid == sid]
        return up


async def settle() -> None:
    """Let scheduled callbacks and tasks (dials, closes) run."""
    for _ in range(10):
        await asyncio.sleep(0)


def no_leftovers(c: Client) -> None:
    """Nothing of a stream is left: no stream state, no admission; once the connection is
    gone, no deadline either."""
    assert c.conn.streams == {}
    assert c.pool.active_requests == 0
    if c.conn.closed:
        assert c.conn not in DEADLINES.members


# -- 1. the basics ---------------------------------------------------------------------------


async def test_get_is_routed_with_authority_as_host_and_answered():
    """A GET: the router sees `:authority` as `host` and `:path` as the target; the answer's
    head, body and trailers reach the client on that stream."""
    c = Client()
    sid = c.request(b"/items?x=1", extra=[(b"accept", b"*/*")])
    await c.settle()
    (ex,) = c.router.routed
    assert (ex.method, ex.target) == (b"GET", b"/items?x=1")
    assert (b"host", b"svc.local") in ex.headers and (b"accept", b"*/*") in ex.headers
    (up,) = c.app.ups
    assert up.head.startswith(b"GET /items?x=1 HTTP/1.1\r\n") and up.ended
    up.answer(
        200,
        [(b"Content-Type", b"text/plain"), (b"Connection", b"close")],
        b"hello",
        trailers=[(b"X-Checksum", b"abc")],
    )
    c.read()
    a = c.answers[sid]
    assert (a.status, bytes(a.data), a.ended) == (200, b"hello", True)
    assert a.header(b"content-type") == b"text/plain"
    assert a.header(b"connection") is None  # connection-specific: never sent over h2
    assert a.trailers == [(b"x-checksum", b"abc")]
    assert c.log.records[0].status == 200 and c.log.records[0].protocol == "HTTP/2"
    no_leftovers(c)


async def test_post_body_reaches_the_upstream_and_two_streams_interleave():
    """Two streams at once: a POST whose body comes in pieces and a GET; the answers come
    back interleaved, each complete on its own stream."""
    c = Client()
    post = c.request(b"/upload", b"POST", b"part1-", end=False)
    get = c.request(b"/status")
    await c.settle()
    c.h2.send_data(post, b"part2", end_stream=True)
    c.send()
    up_post, up_get = c.app.ups
    assert bytes(up_post.body) == b"part1-part2" and up_post.ended
    up_get.answer(200, body=b"g1", done=False)
    up_post.answer(201, body=b"p1", done=False)
    up_get.send(b"g2", done=True)
    up_post.send(b"p2", done=True)
    c.read()
    assert (c.answers[post].status, bytes(c.answers[post].data)) == (201, b"p1p2")
    assert (c.answers[get].status, bytes(c.answers[get].data)) == (200, b"g1g2")
    assert c.answers[post].ended and c.answers[get].ended
    no_leftovers(c)


# -- 2. refusals ------------------------------------------------------------------------------


async def test_refused_plain_request_gets_the_json_error():
    c = Client()
    c.router.refuse = SidecarError("forbidden", "policy says no", fields={"rule": "deny-all"})
    sid = c.request(b"/admin")
    c.read()
    a = c.answers[sid]
    assert a.status == 403 and a.ended
    assert a.header(b"content-type") == b"application/json"
    assert json.loads(a.data) == {
        "error": "forbidden",
        "detail": "policy says no",
        "rule": "deny-all",
    }
    assert int(a.header(b"content-length")) == len(a.data)
    assert c.app.ups == []
    no_leftovers(c)


async def test_refused_grpc_call_gets_one_headers_frame_with_grpc_status():
    """A gRPC call the router refuses: HTTP 200, `grpc-status` and a percent-encoded
    `grpc-message`, in one HEADERS frame that ends the stream; a detail with non-ASCII
    and a line break is carried, not injected."""
    c = Client()
    detail = "refusé\r\nx-injected: yes"
    c.router.refuse = SidecarError("forbidden", detail)
    sid = c.grpc()
    c.read()
    a = c.answers[sid]
    assert a.head_ended and a.data == b"" and a.trailers is None
    assert a.status == 200
    assert a.header(b"grpc-status") == b"%d" % grpc_status(c.router.refuse) == b"7"
    message = a.header(b"grpc-message")
    assert message.isascii() and b"\r" not in message and b"\n" not in message
    assert urllib.parse.unquote(message.decode()) == detail
    assert a.header(b"x-injected") is None
    assert c.log.records[0].grpc_status == 7
    no_leftovers(c)


@pytest.mark.parametrize(
    ("code", "grpc"), [("invalid_token", 16), ("upstream_timeout", 4), ("unknown_service", 12)]
)
async def test_grpc_status_follows_the_error_table(code, grpc):
    c = Client()
    c.router.refuse = SidecarError(code, "no")
    sid = c.grpc()
    c.read()
    assert c.answers[sid].header(b"grpc-status") == b"%d" % grpc


async def test_refused_call_with_body_still_coming_is_answered_then_reset():
    """A refusal while the client still uploads: the answer, then RST_STREAM NO_ERROR (RFC
    9113 8.1); what it had sent is acknowledged (the connection's window is not lost)."""
    c = Client()
    c.router.refuse = SidecarError("forbidden", "no")
    sid = c.request(b"/up", b"POST", b"x" * 1000, end=False)
    c.read()
    a = c.answers[sid]
    assert a.status == 403 and a.reset == h2.errors.ErrorCodes.NO_ERROR
    assert c.app.ups == []


async def test_error_body_waits_for_a_small_client_window():
    """A client that announced a 10-byte window still gets the whole error body, and the
    end of the stream, as its window reopens."""
    c = Client(settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10}, acks=False)
    c.router.refuse = SidecarError("forbidden", "policy says no to this one")
    sid = c.request(b"/admin")
    c.read()
    for _ in range(20):
        if c.answers[sid].ended:
            break
        c.h2.increment_flow_control_window(10, sid)
        c.send()
        c.read()
    a = c.answers[sid]
    assert a.ended, bytes(a.data)
    assert json.loads(a.data)["error"] == "forbidden"
    no_leftovers(c)


# -- 3. header limits and malformed heads ------------------------------------------------------


async def test_header_list_over_the_limit_is_431_and_never_routed():
    c = Client(limits=Limits(max_header_bytes=8192))
    sid = c.request(extra=[(b"x-big", b"a" * 10_000)])
    c.read()
    assert c.answers[sid].status == 431
    assert c.router.routed == [] and c.app.ups == []
    c.grpc(path=b"/small")  # the connection goes on
    assert [ex.target for ex in c.router.routed] == [b"/small"]


async def test_header_limit_above_h2s_default_is_honoured():
    """`max_header_bytes` of 200 KB: an 80 KB header list is routed (h2's own bound is
    64 KiB), 250 KB is 431, and a list past twice the limit closes the connection."""
    c = Client(limits=Limits(max_header_bytes=200_000))
    c.request(extra=[(b"x-big", b"a" * 80_000)])
    assert len(c.router.routed) == 1
    sid = c.request(extra=[(b"x-big", b"b" * 250_000)])
    c.read()
    assert c.answers[sid].status == 431 and len(c.router.routed) == 1
    c.request(extra=[(b"x-big", b"c" * 450_000)])
    c.read()
    assert c.goaway is not None and c.goaway.error_code == CALM and c.wire.closed


async def test_grpc_header_list_over_the_limit_is_resource_exhausted():
    c = Client(limits=Limits(max_header_bytes=8192))
    sid = c.request(
        b"/pkg.Svc/Call",
        b"POST",
        extra=[(b"content-type", b"application/grpc"), (b"x-big", b"a" * 10_000)],
    )
    c.read()
    assert c.answers[sid].header(b"grpc-status") == b"8"
    assert c.router.routed == []


async def test_hpack_bomb_is_bounded():
    """One 4000-byte field, then the same field indexed 20,000 times (a few bytes each,
    80 MB once decoded): the connection is closed before anything is routed, fast."""
    c = Client()
    start = time.perf_counter()
    c.request(extra=[(b"x-bomb", b"b" * 4000)] * 20_000)
    c.read()
    assert time.perf_counter() - start < 2
    assert c.goaway is not None and c.goaway.error_code in (
        CALM,
        h2.errors.ErrorCodes.PROTOCOL_ERROR,
    )
    assert c.wire.closed and c.router.routed == []


async def test_endless_continuation_frames_are_refused():
    """HEADERS without END_HEADERS and then CONTINUATION frames without end
    (CVE-2024-27316 and friends): refused once too many are held."""
    c = Client()
    block = c.h2.encoder.encode(c.fields())
    frames = [bytes([0, 0, len(block), 1, 0x01, 0, 0, 0, 1]) + block]  # HEADERS, END_STREAM
    filler = b"\x40\x03abc\x03def" * 1000  # literal fields; never ended
    for _ in range(200):
        frames.append(len(filler).to_bytes(3, "big") + b"\x09\x00\x00\x00\x00\x01" + filler)
    c.conn.data_received(b"".join(frames))
    c.read()
    assert c.wire.closed and c.router.routed == []


MALFORMED = {
    "uppercase name": [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"a"),
        (b":path", b"/"),
        (b"X-Upper", b"1"),
    ],
    "connection header": [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"a"),
        (b":path", b"/"),
        (b"connection", b"keep-alive"),
    ],
    "transfer-encoding": [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"a"),
        (b":path", b"/"),
        (b"transfer-encoding", b"chunked"),
    ],
    "te gzip": [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"a"),
        (b":path", b"/"),
        (b"te", b"gzip"),
    ],
    "no :path": [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a")],
    "pseudo after regular": [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b"accept", b"*/*"),
        (b":authority", b"a"),
        (b":path", b"/"),
    ],
    "CR LF in a value": [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"a"),
        (b":path", b"/"),
        (b"x-a", b"1\r\nx-forwarded-client-cert: forged"),
    ],
    "host and :authority differ": [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"a"),
        (b":path", b"/"),
        (b"host", b"b"),
    ],
    "two content-lengths": [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"a"),
        (b":path", b"/"),
        (b"content-length", b"1"),
        (b"content-length", b"2"),
    ],
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_heads_are_protocol_errors_never_forwarded(case):
    c = Client()
    sid = c.request(fields=MALFORMED[case], end=False)
    c.read()
    reset = c.answers.get(sid, Answer()).reset
    goaway = c.goaway is not None and c.goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert goaway or reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert c.router.routed == [] and c.app.ups == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        (b"GET", b"http://other.svc/x"),  # absolute form: RFC 9113 8.3.1 wants origin form
        (b"GET", b"admin"),
        (b"GET", b"/a b"),  # a space would split the app's HTTP/1.1 request line
        (b"GET", b"/a\tb"),
        (b"GET /admin", b"/public"),  # a method that is not a token
        (b"OPTIONS", b"*x"),
    ],
)
async def test_paths_and_methods_http1_would_misread_are_refused(method, path):
    c = Client()
    sid = c.request(path, method)
    c.read()
    a = c.answers[sid]
    assert a.status == 400 or a.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert c.router.routed == [] and c.app.ups == []


async def test_options_asterisk_is_routed():
    c = Client()
    c.request(b"*", b"OPTIONS")
    assert [ex.target for ex in c.router.routed] == [b"*"]


async def test_connect_is_refused():
    c = Client()
    fields = [(b":method", b"CONNECT"), (b":authority", b"db.svc:5432")]
    sid = c.request(fields=fields, end=False)
    c.read()
    assert c.answers[sid].status == 405
    assert c.router.routed == [] and c.app.ups == []


async def test_extended_connect_is_refused():
    """RFC 8441 (WebSocket over HTTP/2) was never offered: `:protocol` is an error."""
    c = Client()
    fields = [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"https"),
        (b":authority", b"a"),
        (b":path", b"/ws"),
    ]
    sid = c.request(fields=fields, end=False)
    c.read()
    a = c.answers.get(sid, Answer())
    assert a.status == 405 or a.reset is not None or c.goaway is not None
    assert c.router.routed == [] and c.app.ups == []


async def test_body_longer_than_content_length_never_completes_upstream():
    c = Client()
    sid = c.request(b"/up", b"POST", extra=[(b"content-length", b"3")], end=False)
    await c.settle()
    c.h2.send_data(sid, b"abcdef", end_stream=True)
    c.send()
    c.read()
    (up,) = c.app.ups
    assert not up.ended
    assert c.goaway is not None or c.answers[sid].reset is not None


async def test_declared_body_over_the_limit_is_413_before_routing():
    c = Client(limits=Limits(max_body_bytes=1000))
    sid = c.request(b"/up", b"POST", extra=[(b"content-length", b"5000")], end=False)
    c.read()
    assert c.answers[sid].status == 413 and c.router.routed == []
    assert c.answers[sid].reset == h2.errors.ErrorCodes.NO_ERROR  # (the rest is not wanted)


async def test_streamed_body_over_the_limit_is_413_and_stops_there():
    """No content-length: the body is forwarded until it passes the limit, then the client
    gets 413 and RST_STREAM NO_ERROR; the upstream is cancelled and its window given back."""
    c = Client(limits=Limits(max_body_bytes=100_000))
    sid = c.request(b"/up", b"POST", end=False)
    await c.settle()
    c.upload(sid, b"b" * 150_000)
    c.read()
    (up,) = c.app.ups
    assert c.answers[sid].status == 413
    assert len(up.body) <= 100_000 and not up.ended and up.detached
    assert c.log.records[0].error == "too_large"
    no_leftovers(c)
    for _ in range(15):  # 1.35 MB in all, more than the connection's window
        sid = c.request(b"/next", b"POST", end=False)
        assert c.upload(sid, b"n" * 90_000, end=True) == 90_000
        await c.settle()
        c.upstream(sid).answer(200)
        c.read()
    assert c.answers[sid].status == 200


# -- 4. flow control ----------------------------------------------------------------------------


async def test_slow_client_pauses_the_upstream_and_what_is_held_stays_bounded():
    """A client that never reopens its window: the engine holds at most about HIGH bytes
    for the stream and pauses the upstream; once the client reads, it is resumed, and the
    whole answer arrives."""
    c = Client(acks=False)
    sid = c.request(b"/big")
    await c.settle()
    (up,) = c.app.ups
    up.answer(200, done=False)
    chunk = b"z" * 65536
    total = 0
    for _ in range(100):  # the app writes while it is not paused
        if up.reading_paused:
            break
        up.send(chunk)
        total += len(chunk)
    c.read()
    st = c.conn.streams[sid]
    assert up.reading_paused
    assert st.out.size <= HIGH + len(chunk)
    assert total <= 65535 + HIGH + len(chunk)
    assert len(c.answers[sid].data) == 65535  # the client's default window, no more

    want = 4 * 1024 * 1024
    for _ in range(1000):
        c.h2.acknowledge_received_data(len(c.answers[sid].data) - acked(c, sid), sid)
        c.send()
        c.read()
        if not up.reading_paused and total < want:
            up.send(chunk, done=total + len(chunk) >= want)
            total += len(chunk)
        assert c.conn.streams.get(sid) is None or c.conn.streams[sid].out.size <= HIGH + len(chunk)
        if c.answers[sid].ended:
            break
    assert up.resumes >= 1
    assert len(c.answers[sid].data) == total == want and c.answers[sid].ended
    no_leftovers(c)


async def test_many_slow_downloads_hold_a_bounded_total():
    """A client opens 100 downloads and reads nothing: what the connection holds stays near
    CONN_HIGH (not 100 x HIGH) with every upstream paused; once it reads, they all go on
    and finish."""
    c = Client(acks=False)
    sids = [c.request(b"/big") for _ in range(100)]
    await c.settle()
    ups = {sid: c.upstream(sid) for sid in sids}
    chunk, want = b"z" * 65536, 4 * 65536
    sent = dict.fromkeys(sids, 0)

    def produce():
        for sid, up in ups.items():
            while not up.reading_paused and sent[sid] < want:
                sent[sid] += len(chunk)
                up.send(chunk, done=sent[sid] == want)

    for up in ups.values():
        up.answer(200, done=False)
    produce()
    c.read()
    held = sum(st.out.size for st in c.conn.streams.values())
    assert held == c.conn.held.size <= CONN_HIGH + len(chunk)
    assert all(up.reading_paused for sid, up in ups.items() if sent[sid] < want)
    assert sum(sent.values()) < 2 * CONN_HIGH  # (of the 25 MB asked for)

    c.acks = True  # the client reads now, with a bigger window
    c.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    c.h2.increment_flow_control_window(16 << 20)
    c.send()
    for _ in range(200):
        c.read()
        produce()
        if all(c.answers[sid].ended for sid in sids):
            break
    assert all(len(c.answers[sid].data) == want for sid in sids)
    assert c.conn.held.size == 0
    no_leftovers(c)


async def test_window_update_flood_costs_no_pass_over_every_stream(monkeypatch):
    """300 streams, most of them waiting for the connection's window; 10,000
    WINDOW_UPDATEs of one byte each in one read: the streams waiting are visited in one
    pass that stops once the window is spent, not every stream 10,000 times."""
    c = Client(acks=False)
    sids = [c.request(b"/x") for _ in range(300)]
    await c.settle()
    for sid in sids:
        c.upstream(sid).answer(200, body=b"d" * 1000, done=False)
    c.read()
    assert len(c.conn.blocked) == 300 - 65535 // 1000
    calls = 0
    flush_out = H2Stream.flush_out

    def counting(self):
        nonlocal calls
        calls += 1
        flush_out(self)

    monkeypatch.setattr(H2Stream, "flush_out", counting)
    for _ in range(10_000):
        c.h2.increment_flow_control_window(1)
    c.send()
    assert calls <= 20
    c.read()
    assert sum(len(a.data) for a in c.answers.values()) == 65535 + 10_000


async def test_a_huge_header_table_allowed_by_the_client_is_not_used():
    """A client allows a 1 GiB HPACK table: the engine keeps its own at 4 KiB (else every
    distinct header field it ever sent stays in memory), and the client still decodes
    every answer."""
    c = Client(settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1 << 30})
    for i in range(200):
        sid = c.request(b"/x")
        await settle()
        c.upstream(sid).answer(200, [(b"x-id", b"%0100d" % i)])
        c.read()
        assert c.answers[sid].header(b"x-id") == b"%0100d" % i
    table = c.conn.h2.encoder.header_table
    assert sum(32 + len(k) + len(v) for k, v in table.dynamic_entries) <= ENCODER_TABLE


async def test_answer_complete_while_paused_resumes_its_upstream():
    """The app's read that ends an answer the slow client has not taken: the upstream that
    was paused for it is resumed at once (an HTTP/1.1 connection goes back to the pool, and
    its next exchange must not find it paused)."""
    c = Client(acks=False)
    sid = c.request(b"/big")
    await c.settle()
    up = c.upstream(sid)
    up.answer(200, done=False)
    up.send(b"z" * (HIGH + 100_000))
    assert up.reading_paused
    up.send(b"end", done=True)  # (the rest of the same read)
    assert not up.reading_paused
    assert sid in c.conn.streams  # (its data still waits for the client)


def acked(c: Client, sid: int) -> int:
    """How much of stream `sid`'s data the client has acknowledged so far (tracked here)."""
    done = c.__dict__.setdefault("_acked", {})
    n = done.get(sid, 0)
    done[sid] = len(c.answers[sid].data)
    return n


async def test_fast_uploader_is_stopped_by_its_window_while_the_upstream_is_full():
    """The upstream cannot take more (write_paused): the engine stops acknowledging, so the
    client's window runs out and stays at 0; once the upstream drains, it reopens."""
    c = Client()
    sid = c.request(b"/up", b"POST", b"first", end=False)
    await c.settle()
    (up,) = c.app.ups
    up.write_paused = True
    up.down.pause_reading()
    sent = c.upload(sid, b"u" * (4 * WINDOW))
    assert c.h2.local_flow_control_window(sid) == 0
    assert sent <= WINDOW + 65535
    assert len(up.body) == sent + 5  # nothing held in the engine: the app has it
    c.read()
    assert c.h2.local_flow_control_window(sid) == 0  # and it stays shut
    up.unpause()
    c.read()
    assert c.h2.local_flow_control_window(sid) > 0
    more = c.upload(sid, b"v" * 100_000, end=True)
    assert more == 100_000 and up.ended


async def test_body_held_before_the_upstream_is_acknowledged_once_it_drains():
    """Body that arrived before the dial finished, sent to an upstream that is full at
    once: acknowledged when it drains (else the connection's window shrinks for good, and
    a few such streams stall every stream on the connection)."""
    gate = asyncio.Event()
    app = App(gate)
    app.pause_on_send = True
    c = Client(app=app)
    for _ in range(3):
        sid = c.request(b"/up", b"POST", end=False)
        c.upload(sid, b"p" * 600_000)
        gate.set()
        await c.settle()
        up = app.ups[-1]
        assert len(up.body) == 600_000
        up.unpause()
        c.h2.end_stream(sid)
        c.send()
        up.answer(200)
        c.read()
        assert c.answers[sid].status == 200
        gate.clear()
    assert c.h2.local_flow_control_window(c.request(b"/x", b"POST", end=False)) > 500_000


async def test_streams_reset_with_unacknowledged_body_give_the_window_back():
    """A client that uploads and resets before the upstream took the body, twice: the
    connection's window is not lost (a third upload still goes through)."""
    gate = asyncio.Event()
    c = Client(app=App(gate))
    for _ in range(2):
        sid = c.request(b"/up", b"POST", end=False)
        c.upload(sid, b"r" * 700_000)
        c.reset(sid)
        await c.settle()
    gate.set()
    sid = c.request(b"/up", b"POST", end=False)
    assert c.upload(sid, b"s" * 700_000, end=True) == 700_000
    await c.settle()
    assert c.app.ups[-1].body == b"s" * 700_000


async def test_client_that_does_not_read_its_socket_is_not_read_either():
    """A client that floods PINGs (each one answered) and never reads: once its socket
    is full the engine stops reading it (CVE-2019-9512), so what it holds is bounded."""
    c = Client(high_water=64 * 1024)
    for _ in range(5000):
        c.h2.ping(b"12345678")
    c.send()
    assert c.wire.writing_paused
    assert c.wire.reading_paused
    c.read()
    assert not c.wire.reading_paused


# -- 5. resets -----------------------------------------------------------------------------------


async def test_client_reset_mid_answer_cancels_the_upstream_and_the_connection_goes_on():
    c = Client()
    sid = c.request(b"/stream")
    await c.settle()
    (up,) = c.app.ups
    up.answer(200, body=b"part", done=False)
    c.read()
    c.reset(sid)
    assert up.cancelled
    (rec,) = c.log.records
    assert rec.error == "client_disconnected"
    assert c.conn.streams == {} and c.pool.active_requests == 0
    sid = c.request(b"/again")
    await c.settle()
    c.app.ups[-1].answer(200, body=b"ok")
    c.read()
    assert bytes(c.answers[sid].data) == b"ok"


async def test_reset_of_the_last_stream_rearms_the_idle_timeout():
    c = Client(limits=Limits(idle_timeout=5))
    sid = c.request(b"/x")
    await c.settle()
    c.reset(sid)
    assert c.conn.on_deadline is not None


async def test_rapid_reset_leaks_nothing_and_ends_with_goaway():
    """CVE-2023-44487: 10,000 streams opened and reset at once on one connection. No
    per-stream state stays behind, the pool's admissions return to 0, every upstream that
    was started is cancelled, and the connection is told to go away (ENHANCE_YOUR_CALM)
    long before 10,000 upstreams were started."""
    c = Client()
    for _ in range(10_000):
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(sid, c.fields(b"/r"), end_stream=True)
        c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        if sid % 200 == 1:
            c.send()
            if c.wire.closed:
                break
    c.send()
    await c.settle()
    assert c.goaway is not None and c.goaway.error_code == CALM
    assert c.wire.closed
    no_leftovers(c)
    assert len(c.router.routed) <= RESET_FLOOR
    assert all(up.cancelled or not up.ex for up in c.app.ups)


async def test_clients_that_cancel_some_calls_are_not_cut_off():
    """A client that cancels one call in three (deadlines, user actions) keeps its
    connection over hundreds of calls."""
    c = Client()
    for i in range(600):
        sid = c.request(b"/call")
        if i % 3 == 0:
            c.reset(sid)
        else:
            await settle()
            c.upstream(sid).answer(200, body=b"ok")
            c.read()
    assert c.goaway is None and not c.wire.closed
    no_leftovers(c)


# -- 6. the connection's end --------------------------------------------------------------------


async def test_client_gone_with_streams_open_cancels_every_upstream():
    group = ConnGroup()
    c = Client(group=group)
    for _ in range(3):
        c.request(b"/long")
    await c.settle()
    assert len(c.app.ups) == 3 and c.conn in group.conns
    c.wire.lose()
    assert all(up.cancelled for up in c.app.ups)
    assert c.conn not in group.conns and c.router.released == 1
    assert [r.error for r in c.log.records] == ["client_disconnected"] * 3
    no_leftovers(c)


async def test_drain_sends_goaway_lets_open_streams_finish_then_closes():
    group = ConnGroup()
    c = Client(group=group)
    sid = c.request(b"/slow")
    await c.settle()
    (up,) = c.app.ups
    group.drain()
    late = c.request(b"/late")  # opened before the client read the GOAWAY
    c.read()
    assert c.goaway is not None and c.goaway.last_stream_id == sid
    assert c.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert not c.wire.closed
    assert c.answers[late].reset == h2.errors.ErrorCodes.REFUSED_STREAM  # safe to retry
    assert len(c.router.routed) == 1
    # the open one finishes, over many of the client's window updates
    up.answer(200, body=b"x" * 200_000)
    for _ in range(10):
        c.read()
    assert c.answers[sid].ended and len(c.answers[sid].data) == 200_000
    await settle()
    assert c.wire.closed and c.conn not in group.conns
    no_leftovers(c)


async def test_client_goaway_lets_its_open_streams_finish():
    """A client that sends GOAWAY (it is shutting down gracefully) still gets the answers
    of the streams it opened (RFC 9113 6.8); then the connection closes."""
    c = Client()
    sid = c.request(b"/x")
    await c.settle()
    c.conn.data_received(GoAwayFrame(0, last_stream_id=0).serialize())
    c.app.ups[0].answer(200, body=b"done")
    c.read()
    assert c.answers[sid].ended and bytes(c.answers[sid].data) == b"done"
    await settle()
    assert c.wire.closed


async def test_drain_of_an_idle_connection_closes_it_at_once():
    group = ConnGroup()
    c = Client(group=group)
    group.drain()
    c.read()
    assert c.goaway is not None and c.wire.closed
    await settle()
    assert c.conn not in group.conns and c.conn not in DEADLINES.members


async def test_idle_connection_is_closed_after_the_idle_timeout():
    c = Client(limits=Limits(idle_timeout=60))
    assert c.conn.on_deadline is not None
    c.conn.on_deadline()  # (what the sweep calls once the deadline passed)
    c.read()
    assert c.goaway is not None and c.wire.closed


async def test_idle_timeout_never_cuts_a_busy_connection():
    c = Client(limits=Limits(idle_timeout=60))
    c.request(b"/x")
    await c.settle()
    assert c.conn.on_deadline is None
    c.app.ups[0].answer(200)
    c.read()
    assert c.conn.on_deadline is not None


# -- 7. the upstream side: H2Upstream against an h2 server ---------------------------------------


class Sink:
    """A `ResponseSink` that records what the upstream stream told it."""

    def __init__(self):
        self.events: list[tuple] = []
        self.body = bytearray()
        self.failed: tuple[str, str | None] | None = None
        self.pauses = 0
        self.resumes = 0

    def response_head(self, ex, status, reason, headers, framing):
        self.events.append(("head", status, framing.kind))

    def response_body(self, ex, data):
        self.body += data

    def response_trailers(self, ex, trailers):
        self.events.append(("trailers", list(trailers)))

    def response_done(self, ex):
        self.events.append(("done",))

    def upstream_failed(self, ex, err, cause=None):
        self.failed = (err.code, cause)

    def retry(self, ex):
        raise AssertionError("not for HTTP/2")

    def retry_status(self, ex, status):
        return False

    def pause_reading(self):
        self.pauses += 1

    def resume_reading(self):
        self.resumes += 1

    def cork(self):
        pass

    def uncork(self):
        pass


class H2App:
    """The app's side of one HTTP/2 connection: a real h2 server."""

    def __init__(self, up: H2Upstream):
        self.up = up
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()
        self.wire = Wire(up)
        self.acks = True  # reopen the window for what it reads (else: `unacked`)
        self.unacked: dict[int, int] = {}
        self.ended: set[int] = set()
        self.requests: dict[int, list] = {}
        self.resets: dict[int, int] = {}
        self.data: dict[int, bytearray] = {}
        self.flush()

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.up.data_received(data)

    def read(self):
        for ev in self.h2.receive_data(self.wire.take()):
            if isinstance(ev, h2.events.RequestReceived):
                self.requests[ev.stream_id] = ev.headers
            elif isinstance(ev, h2.events.DataReceived):
                self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                if self.acks:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                else:
                    n = self.unacked.get(ev.stream_id, 0) + ev.flow_controlled_length
                    self.unacked[ev.stream_id] = n
            elif isinstance(ev, h2.events.StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.resets[ev.stream_id] = ev.error_code
        self.flush()

    def take(self):
        """Reopen the windows for everything read so far (and read on like that)."""
        self.acks = True
        for sid, n in self.unacked.items():
            self.h2.acknowledge_received_data(n, sid)
        self.unacked.clear()
        self.flush()

    def respond(self, sid, headers, body=None, end=True):
        self.h2.send_headers(sid, headers, end_stream=end and body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=end)
        self.flush()


class H2Rig:
    """A multiplexed pool whose one connection goes to an `H2App`."""

    def __init__(self):
        self.apps: list[H2App] = []
        self.pool = UpstreamPool("app", [("127.0.0.1", 8080)], self._connect, multiplexed=True)

    async def _connect(self, pool, host, port):
        up = H2Upstream(pool, b"http")
        self.apps.append(H2App(up))
        self.apps[-1].read()
        return up

    async def call(self, path=b"/", timeout=5.0):
        """A GET sent on a new stream: (the stream, its sink, its exchange)."""
        ex = Exchange(b"GET", path, [], "2", True, ExchangeRecord("test"), body_done=True)
        ex.head = b"GET %s HTTP/1.1\r\nhost: app\r\n" % path
        st = await self.pool.connect(self.pool.endpoints[0])
        sink = Sink()
        st.send_request(ex, sink, timeout)
        self.apps[0].read()
        return st, sink, ex


async def test_upstream_trailers_only_answer_is_head_then_done():
    rig = H2Rig()
    st, sink, ex = await rig.call(b"/pkg.Svc/Call")
    app = rig.apps[0]
    assert app.requests[st.sid][0] == (b":method", b"GET")
    app.respond(
        st.sid,
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"7")],
    )
    assert sink.events == [("head", 200, Kind.NONE), ("done",)]
    assert sink.failed is None
    assert st not in DEADLINES.members and st.sid not in st.conn.streams


async def test_upstream_refused_stream_is_a_retryable_reset():
    rig = H2Rig()
    st, sink, ex = await rig.call()
    rig.apps[0].h2.reset_stream(st.sid, h2.errors.ErrorCodes.REFUSED_STREAM)
    rig.apps[0].flush()
    assert sink.failed == ("upstream_reset", "reset")
    assert st not in DEADLINES.members


async def test_upstream_goaway_fails_only_the_streams_above_its_last_id():
    """GOAWAY with last_stream_id 3 (graceful: the app goes on serving 1 and 3): stream 5
    fails as refused (retryable), 1 and 3 are answered, no new stream is opened there."""
    rig = H2Rig()
    calls = [await rig.call(b"/%d" % i) for i in range(3)]
    app = rig.apps[0]
    assert [st.sid for st, _, _ in calls] == [1, 3, 5]
    app.up.data_received(GoAwayFrame(0, last_stream_id=3).serialize())
    assert calls[2][1].failed == ("upstream_reset", "reset")
    assert calls[0][1].failed is None and calls[1][1].failed is None
    for st, sink, _ in calls[:2]:
        app.respond(st.sid, [(b":status", b"200")], b"body-%d" % st.sid)
        assert sink.events[-1] == ("done",), sink.events
        assert bytes(sink.body) == b"body-%d" % st.sid
    assert not app.up.usable()


async def test_upstream_connection_out_of_stream_ids_is_replaced():
    """After 2**30 streams a connection has no stream id left: the next exchange goes on a
    new connection (not an exception), and the old one is closed once its last stream ends."""
    rig = H2Rig()
    st, sink, ex = await rig.call()
    first = rig.apps[0]
    first.up.h2.highest_outbound_stream_id = 2**31 - 1  # (as after a billion streams)
    await rig.call()
    assert len(rig.apps) == 2 and not first.wire.closed  # (its stream is still open)
    first.respond(st.sid, [(b":status", b"200")])
    assert sink.events[-1] == ("done",)
    await rig.call()
    assert len(rig.apps) == 2 and first.wire.closed


async def test_upstream_response_timeout_cancels_the_stream():
    rig = H2Rig()
    st, sink, ex = await rig.call(timeout=0.5)
    assert st in DEADLINES.members and st.on_deadline is not None
    st.on_deadline()  # (what the sweep calls once the deadline passed)
    rig.apps[0].read()
    assert sink.failed == ("upstream_timeout", "timeout")
    assert rig.apps[0].resets[st.sid] == h2.errors.ErrorCodes.CANCEL
    assert st not in DEADLINES.members


async def test_upstream_answer_streams_to_the_sink_with_trailers():
    rig = H2Rig()
    st, sink, ex = await rig.call()
    app = rig.apps[0]
    app.respond(st.sid, [(b":status", b"200"), (b"content-length", b"5")], b"hello", end=False)
    app.h2.send_headers(st.sid, [(b"grpc-status", b"0")], end_stream=True)
    app.flush()
    assert sink.events == [
        ("head", 200, Kind.LENGTH),
        ("trailers", [(b"grpc-status", b"0")]),
        ("done",),
    ]
    assert bytes(sink.body) == b"hello"


async def test_upstream_upload_is_paced_by_the_apps_window():
    """An upload to an app that reads slowly: past HIGH held, the client side is paused;
    once the app reads, it is resumed, and the app gets every byte and the end."""
    rig = H2Rig()
    await rig.call()  # (the connection is up)
    app = rig.apps[0]
    app.acks = False
    ex = Exchange(b"POST", b"/up", [], "2", True, ExchangeRecord("test"), framing=CHUNKED)
    ex.head = b"POST /up HTTP/1.1\r\nhost: app\r\n"
    st = await rig.pool.connect(rig.pool.endpoints[0])
    sink = Sink()
    st.send_request(ex, sink, 5.0)
    sent = 0
    while not st.write_paused:
        st.send_body(ex, b"u" * 65536)
        sent += 65536
    app.read()
    assert sink.pauses == 1 and st.out.size <= HIGH + 65536
    app.take()
    for _ in range(100):
        app.read()
        if not st.write_paused and sent < 2_000_000:
            st.send_body(ex, b"u" * 65536)
            sent += 65536
            if sent >= 2_000_000:
                st.end_request(ex)
        if st.sid in app.ended:
            break
    assert sink.resumes >= 1
    assert len(app.data[st.sid]) == sent and st.sid in app.ended


async def test_upstream_streams_cancelled_while_paused_give_the_window_back():
    """The client side paused a stream (slow client) while the app kept sending, then the
    client went away, twice: the shared connection's window is not lost (a third stream
    on it still gets its whole answer)."""
    rig = H2Rig()
    for _ in range(2):
        st, sink, ex = await rig.call()
        app = rig.apps[0]
        app.respond(st.sid, [(b":status", b"200")], end=False)
        st.pause_reading()
        sent = 0
        while sent < 700_000:
            room = app.h2.local_flow_control_window(st.sid)
            piece = min(room, 16384, 700_000 - sent)
            if piece <= 0:
                break
            app.h2.send_data(st.sid, b"d" * piece)
            sent += piece
            app.flush()
        assert len(sink.body) == sent
        st.cancel()
        app.read()
    st, sink, ex = await rig.call()
    app.respond(st.sid, [(b":status", b"200")], end=False)
    room = app.h2.local_flow_control_window(st.sid)
    assert room >= 700_000, room


async def test_whole_path_client_reset_reaches_the_app_as_cancel():
    """H2Downstream in front of an H2Upstream: the client's RST_STREAM reaches the app as
    RST_STREAM CANCEL on the shared connection, which stays usable."""
    rig = H2Rig()
    c = Client()
    c.router.pool = rig.pool
    sid = c.request(b"/long")
    await c.settle()
    app = rig.apps[0]
    app.read()
    (upsid,) = app.requests
    app.respond(upsid, [(b":status", b"200")], b"part", end=False)
    c.read()
    assert bytes(c.answers[sid].data) == b"part"
    c.reset(sid)
    app.read()
    assert app.resets[upsid] == h2.errors.ErrorCodes.CANCEL
    sid = c.request(b"/next")
    await c.settle()
    app.read()
    nxt = max(app.requests)
    app.respond(nxt, [(b":status", b"200")], b"fine")
    c.read()
    assert bytes(c.answers[sid].data) == b"fine" and c.answers[sid].ended
    assert len(rig.apps) == 1


async def test_whole_path_client_gone_cancels_every_upstream_stream():
    """The client's connection drops with three calls in flight on one HTTP/2 connection
    to the app: the app sees each stream cancelled, no stream deadline is left, and the
    connection to the app stays for others."""
    rig = H2Rig()
    c = Client()
    c.router.pool = rig.pool
    for _ in range(3):
        c.request(b"/long")
    await c.settle()
    app = rig.apps[0]
    app.read()
    assert len(app.requests) == 3
    c.wire.lose()
    app.read()
    assert app.resets == dict.fromkeys(app.requests, h2.errors.ErrorCodes.CANCEL)
    assert not [m for m in DEADLINES.members if getattr(m, "conn", None) is app.up]
    assert app.up.streams == {} and app.up.usable()
    no_leftovers(c)


async def test_a_failing_client_never_breaks_the_upstream_connection_it_shares():
    """Two clients' streams on one HTTP/2 connection to the app; one client commits a
    protocol error, and the app answers its stream before that connection's close is
    processed: the answer is dropped, nothing is raised into the shared connection's read,
    and the other client gets its answer."""
    rig = H2Rig()
    a, b = Client(), Client()
    a.router.pool = b.router.pool = rig.pool
    sa = a.request(b"/a")
    sb = b.request(b"/b")
    await a.settle()
    app = rig.apps[0]
    app.read()
    by_path = {dict(h)[b":path"]: sid for sid, h in app.requests.items()}
    a.conn.data_received(b"\x00\x00\x01\x04\x00\x00\x00\x00\x00\x00")  # SETTINGS of 1 byte
    assert a.wire.closed
    app.respond(by_path[b"/a"], [(b":status", b"200")], b"late")
    app.respond(by_path[b"/b"], [(b":status", b"200")], b"fine")
    b.read()
    assert bytes(b.answers[sb].data) == b"fine" and b.answers[sb].ended
    await settle()
    assert sa not in a.answers
    assert len(rig.apps) == 1 and not app.wire.closed
    no_leftovers(a)
