"""What a router decides for the HTTP/1.1 engine: who may connect, where a request goes,
how its head looks. The engine asks; `inbound` and `outbound` answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from mypy_extensions import mypyc_attr

from sidecar.engines.http1.framing import Headers
from sidecar.errors import SidecarError
from sidecar.identity.peer import LOCAL_APP, Peer

if TYPE_CHECKING:
    from sidecar.engines.http1.downstream import DownstreamConn
    from sidecar.engines.http1.exchange import Exchange
    from sidecar.upstream.pool import UpstreamPool


class RouteLater(Exception):  # noqa: N818 (a signal, not an error)
    """The router needs to await something (a JWKS refresh) before it can decide.

    The request is held (nothing is sent upstream), `wait()` is awaited, then
    routing runs once more with `Exchange.rerouted` set.
    """

    def __init__(self, wait: Callable[[], Awaitable[Any]]) -> None:
        super().__init__("route later")
        self.wait = wait


class Caller(Protocol):
    """The downstream side a router answers: an HTTP/1.1 connection, or an HTTP/2 stream
    (a Protocol, not `DownstreamConn`: compiled code checks a class-typed argument's class)."""

    peer: Peer
    transport: asyncio.Transport | None


@mypyc_attr(allow_interpreted_subclasses=True)
class Router:
    """The base answers for a local client with nowhere to go; routers override."""

    direction: ClassVar[str] = "?"  # (a class attribute: interpreted subclasses set theirs)

    def accept(self, conn: Caller) -> Peer:
        """Called once the connection (and TLS handshake) is up: the peer, or SidecarError
        to refuse the connection."""
        return LOCAL_APP

    def release(self, conn: Caller) -> None:
        """Called when an accepted connection is gone."""

    def route(self, conn: Caller, ex: Exchange) -> tuple[UpstreamPool, bytes]:
        """The pool to use and the request head (without framing or final CRLF); fills in
        `ex.record`. SidecarError answers the request; RouteLater holds it."""
        raise NotImplementedError

    def tunnel(self, conn: DownstreamConn, ex: Exchange) -> Callable[[], asyncio.Protocol]:
        """CONNECT: the protocol that takes the connection over (it answers the client), or
        SidecarError. The base refuses."""
        raise SidecarError("method_not_allowed", "CONNECT is not supported here")

    def response_headers(self, conn: Caller, ex: Exchange, headers: Headers) -> Headers:
        """Headers sent back downstream (after hop-by-hop removal)."""
        return headers
