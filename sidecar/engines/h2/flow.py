"""What both HTTP/2 ends share: one stream's outgoing data held to the peer's flow-control
window, and turning a request head into HTTP/2 header fields and back.

HTTP/2 lets the receiver of a stream say how many bytes it will take (the
window). An `Outbox` holds what a stream still has to send, sends what the
window allows when asked (`flush`), and ends the stream (with trailers, if any)
once everything went. What it holds is bounded by its owner: past `HIGH` bytes
the producer (the other connection of the exchange) is paused, and past
`CONN_HIGH` for all the streams of a client connection (their Outboxes count in one
`Held`), every stream's producer is.

Both ends make their `h2` state machine with `connection`, which keeps a connection
open after a GOAWAY is received, so the streams it lets finish can (RFC 9113 6.8).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from h2.config import H2Configuration
from h2.connection import (
    ConnectionInputs,
    ConnectionState,
    H2Connection,
    H2ConnectionStateMachine,
)

from sidecar.engines.http1.framing import Framing, Headers, Kind

HIGH = 256 * 1024  # bytes held for one stream before its producer is paused
# ... and for all the streams of one client connection: without it, a client that opens
# MAX_STREAMS downloads and never reads has HIGH held for each (hundreds of MB).
CONN_HIGH = 4 * HIGH
WINDOW = 1 << 20  # the receive window this side announces, per stream and per connection
MAX_STREAMS = 1000  # concurrent streams a client may open on one connection
ENCODER_TABLE = 4096  # bytes of our HPACK encoder's table (the default), whatever the peer allows
# Connection-specific fields HTTP/2 forbids (RFC 9113 8.2.2), dropped from what is forwarded.
CONNECTION_FIELDS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)


_OPEN = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)


class _GoawayKeepsStreams(H2ConnectionStateMachine):
    """h2's connection states, except that a GOAWAY received does not close the connection.

    h2 closes it at once (python-hyper/h2#1181: the next frame either way is a
    ProtocolError), so the streams at or below the GOAWAY's last stream id, which the
    peer will finish, could not send or receive another frame: a client's graceful
    shutdown or an app's graceful restart would break every call in flight. The
    engines see `ConnectionTerminated` and open or accept no new streams themselves.
    """

    def process_input(self, input_: ConnectionInputs) -> list[Any]:
        """As h2 does, but a received GOAWAY leaves an open connection open."""
        if input_ is ConnectionInputs.RECV_GOAWAY and self.state in _OPEN:
            return []
        return super().process_input(input_)


def connection(config: H2Configuration) -> H2Connection:
    """An h2 connection whose streams outlive a GOAWAY received (`_GoawayKeepsStreams`)."""
    conn = H2Connection(config)
    conn.state_machine = _GoawayKeepsStreams()
    return conn


def cap_encoder(conn: H2Connection) -> None:
    """After the peer's SETTINGS: keep our HPACK encoder's table at ENCODER_TABLE. h2 sizes
    it as the peer allows, up to 4 GiB, and would then keep every distinct header field
    it ever sent on the connection (Go and nghttp2 cap theirs at 4 KiB too)."""
    if conn.encoder.header_table_size > ENCODER_TABLE:
        conn.encoder.header_table_size = ENCODER_TABLE  # (announced in the next block)


class Held:
    """What the Outboxes of one connection hold together (bytes)."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        self.size = 0


class Outbox:
    """What one stream still has to send, and how it ends."""

    __slots__ = ("h2", "sid", "chunks", "size", "held", "ending", "trailers", "ended")

    def __init__(self, h2: H2Connection, sid: int, held: Held | None = None) -> None:
        self.h2 = h2
        self.sid = sid
        self.chunks: deque[memoryview] = deque()
        self.size = 0
        self.held = held or Held()  # shared with the connection's other streams
        self.ending = False  # no more data will be pushed
        self.trailers: Headers | None = None
        self.ended = False  # END_STREAM went out

    def push(self, data: bytes) -> None:
        """Queue `data` (sent by the next `flush`)."""
        if data:
            self.chunks.append(memoryview(data))
            self.size += len(data)
            self.held.size += len(data)

    def drop(self) -> None:
        """Forget what was not sent (the stream is gone, or cannot send any more)."""
        self.held.size -= self.size
        self.size = 0
        self.chunks.clear()

    def finish(self, trailers: Headers | None = None) -> None:
        """Nothing more will be pushed: end the stream once the data is out."""
        self.ending = True
        self.trailers = trailers or None

    def flush(self) -> None:
        """Send what the stream's and the connection's windows allow; end the stream when
        everything has gone."""
        h2 = self.h2
        sid = self.sid
        chunks = self.chunks
        while chunks:
            room = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
            if room <= 0:
                return
            first = chunks[0]
            if len(first) <= room:
                chunks.popleft()
                piece = first
            else:
                piece, chunks[0] = first[:room], first[room:]
            self.size -= len(piece)
            self.held.size -= len(piece)
            h2.send_data(sid, piece.tobytes())
        if self.ending and not self.ended:
            self.ended = True
            if self.trailers:
                h2.send_headers(sid, self.trailers, end_stream=True)
            else:
                h2.end_stream(sid)


def h2_headers(
    head: bytes, framing: Framing, scheme: bytes
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """HTTP/2 header fields from a request head the router built in HTTP/1.1 form
    (`METHOD TARGET HTTP/1.1` and `name: value` lines, no framing, no final CRLF), and
    whether the request is gRPC. `host` becomes `:authority`."""
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    fields: list[tuple[bytes, bytes]] = []
    authority = b""
    grpc = False
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"host":
            authority = value
        elif name not in CONNECTION_FIELDS:
            if name == b"content-type" and value.startswith(b"application/grpc"):
                grpc = True
            fields.append((name, value))
    pseudo = [(b":method", method), (b":scheme", scheme), (b":authority", authority)]
    pseudo.append((b":path", target))
    if grpc:
        fields.append((b"te", b"trailers"))  # gRPC servers require it (hop-by-hop in HTTP/1.1)
    if framing.kind is Kind.LENGTH:
        fields.append((b"content-length", b"%d" % framing.length))
    return pseudo + fields, grpc


def response_fields(status: int, headers: Headers) -> list[tuple[bytes, bytes]]:
    """A response head for an HTTP/2 client: `:status`, lowercase names, no
    connection-specific fields."""
    out = [(b":status", b"%d" % status)]
    for k, v in headers:
        lk = k.lower()
        if lk not in CONNECTION_FIELDS:
            out.append((lk, v))
    return out


def split_fields(fields: list[tuple[bytes, bytes]]) -> tuple[dict[bytes, bytes], Headers]:
    """Pseudo-header fields (by name) and the regular ones, in order."""
    pseudo: dict[bytes, bytes] = {}
    regular: Headers = []
    for k, v in fields:
        if k[:1] == b":":
            pseudo[k] = v
        else:
            regular.append((k, v))
    return pseudo, regular
