"""What both HTTP/2 ends share: one stream's outgoing data held to the peer's flow-control
window, and turning a request head into HTTP/2 header fields and back.

HTTP/2 lets the receiver of a stream say how many bytes it will take (the
window). An `Outbox` holds what a stream still has to send, sends what the
window allows when asked (`flush`), and ends the stream (with trailers, if any)
once everything went. What it holds is bounded by its owner: past `HIGH` bytes
the producer (the other connection of the exchange) is paused.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from sidecar.engines.http1.framing import Framing, Headers, Kind

if TYPE_CHECKING:
    from h2.connection import H2Connection

HIGH = 256 * 1024  # bytes held for one stream before its producer is paused
WINDOW = 1 << 20  # the receive window this side announces, per stream and per connection
MAX_STREAMS = 1000  # concurrent streams a client may open on one connection
# Connection-specific fields HTTP/2 forbids (RFC 9113 8.2.2), dropped from what is forwarded.
CONNECTION_FIELDS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)


class Outbox:
    """What one stream still has to send, and how it ends."""

    __slots__ = ("h2", "sid", "chunks", "size", "ending", "trailers", "ended")

    def __init__(self, h2: H2Connection, sid: int) -> None:
        self.h2 = h2
        self.sid = sid
        self.chunks: deque[memoryview] = deque()
        self.size = 0
        self.ending = False  # no more data will be pushed
        self.trailers: Headers | None = None
        self.ended = False  # END_STREAM went out

    def push(self, data: bytes) -> None:
        """Queue `data` (sent by the next `flush`)."""
        if data:
            self.chunks.append(memoryview(data))
            self.size += len(data)

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
