"""The first protocol of every connection: it picks the engine and hands the connection over.

Inbound, the choice is made by the ALPN name the peer and we agreed on in the mTLS
handshake (`sidecar.protocols.engine_for`): HTTP/1.1, HTTP/2, or an opaque pipe
for an app declared `tcp`; an opaque tunnel to an HTTP app is refused. Outbound
(plain TCP from the app), a connection redirected to a `tcp` service's address is
piped at once (the server may speak first); anything else is HTTP, and the first
bytes tell HTTP/2 (the client preface of prior knowledge, RFC 9113 3.3) from
HTTP/1.1. The engine then owns the transport (`transport.set_protocol`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from sidecar.engines.base import ConnGroup
from sidecar.protocols import engine_for

log = logging.getLogger("sidecar.dispatch")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
Factory = Callable[[], asyncio.Protocol]


def hand_over(transport: asyncio.BaseTransport, proto: asyncio.Protocol, data: bytes = b"") -> None:
    """Make `proto` the owner of `transport`, as if it had been connected from the start."""
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if data and not transport.is_closing():
        proto.data_received(data)


class InboundDispatch(asyncio.Protocol):
    """Picks the inbound engine by the ALPN name of the handshake."""

    def __init__(
        self,
        engines: Mapping[str, Factory],
        app_protocol: str,
        group: ConnGroup,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.engines = engines
        self.app_protocol = app_protocol
        self.group = group
        self.on_refused = on_refused
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Hand the connection to its engine, or refuse it."""
        sslobj = transport.get_extra_info("ssl_object")
        alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        make = self.engines.get(engine_for(alpn, self.app_protocol))
        if make is not None:
            hand_over(transport, make())
            return
        # A peer asked for an opaque tunnel to an HTTP app: its policy could not apply.
        log.info("inbound: refused a %r connection: the app speaks %s", alpn, self.app_protocol)
        self.transport = transport  # type: ignore[assignment]
        self.group.add(self)  # (its end releases the listener's place)
        if self.on_refused is not None:
            self.on_refused("protocol_mismatch")
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """A refused connection is gone."""
        self.group.discard(self)

    def drain(self) -> None:
        """Nothing to wait for."""


class OutboundDispatch(asyncio.Protocol):
    """Picks the outbound engine: a pipe for a redirected `tcp` service, else HTTP/2 or
    HTTP/1.1 by the first bytes."""

    def __init__(
        self,
        http1: Factory,
        h2: Factory,
        tcp_for: Callable[[asyncio.BaseTransport], asyncio.Protocol | None] | None,
        header_timeout: float,
        group: ConnGroup,
        greeting: bytes = b"",
    ) -> None:
        self.group = group
        self.http1 = http1
        self.h2 = h2
        self.tcp_for = tcp_for  # the pipe for a connection redirected to a tcp service
        self.header_timeout = header_timeout
        self.greeting = greeting  # written first (a CONNECT tunnel's 200)
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A redirected tcp connection is piped now; HTTP waits for its first bytes."""
        self.transport = transport  # type: ignore[assignment]
        self.group.add(self)  # until an engine takes over: the drain closes it
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]
        if self.tcp_for is not None:
            proto = self.tcp_for(transport)
            if proto is not None:
                self.group.forget(self)
                hand_over(transport, proto)
                return
        self.timer = asyncio.get_running_loop().call_later(self.header_timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        """Enough bytes to tell the preface from an HTTP/1.1 request line: hand over."""
        buf = self.buf + data
        n = min(len(buf), len(PREFACE))
        if buf[:n] == PREFACE[:n] and n < len(PREFACE):
            self.buf = buf  # a prefix of the preface so far: wait for more
            return
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        make = self.h2 if buf.startswith(PREFACE) else self.http1
        self.group.forget(self)
        hand_over(self.transport, make(), buf)

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone before a byte: nothing was started."""
        if self.timer is not None:
            self.timer.cancel()
        self.group.discard(self)

    def drain(self) -> None:
        """Shutting down before a byte came: close."""
        if self.transport is not None:
            self.transport.close()
