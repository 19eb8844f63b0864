"""Opaque TCP through the mesh: connections that are bytes, not requests.

Inbound (`inbound.app_protocol: tcp`): the peer's certificate is checked as for
HTTP (a leaf with one SPIFFE ID of our trust domain, not revoked), then the
policy decides on what a connection has, its principal and namespace
(`Policy.decide_connection`: an ALLOW rule naming paths, methods, JWT
principals or claims never matches; a DENY rule naming them refuses on its
other fields alone). Only then is the app dialled, so a refused peer never
reaches it. Outbound (a service with `protocol: tcp`): the app dials the
service's own loopback port (`listen`), the service's address through
transparent interception (SO_ORIGINAL_DST), or `CONNECT host:port` on the
outbound listener; the sidecar dials an endpoint with mTLS and ALPN
`meshca-tcp`, checks the server's SPIFFE ID, and pipes the bytes.

Each connection is one access-log line when it ends (`protocol: tcp`, bytes each
way, the time it was open), and the pool's circuit breaker, endpoint choice and
outlier detection apply to it as to requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sidecar.engines.base import ConnGroup
from sidecar.engines.tcp.pipe import Pipe, splice
from sidecar.errors import SidecarError
from sidecar.identity.peer import LOCAL_APP, Peer
from sidecar.telemetry.record import ExchangeRecord

if TYPE_CHECKING:
    from sidecar.routing.inbound import InboundRouter
    from sidecar.upstream.pool import UpstreamPool

log = logging.getLogger("sidecar.tcp")

PENDING_LIMIT = 64 * 1024  # bytes a client may send before its upstream is connected


class TcpUpstream(asyncio.Protocol):
    """The upstream end of a TCP connection until it is spliced: holds early bytes."""

    def __init__(self, pool: UpstreamPool | None = None) -> None:
        self.pool = pool
        self.endpoint: Any = None
        self.transport: asyncio.Transport | None = None
        self.peer: Peer = LOCAL_APP
        self.early = bytearray()  # what the server sent before the splice (a greeting)
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.early += data
        if len(self.early) > PENDING_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.pool is not None:
            self.pool.discard(self)

    def abort(self) -> None:
        """Drop the connection."""
        if self.transport is not None:
            self.transport.abort()


class _TcpConn(asyncio.Protocol):
    """What both directions share: the downstream transport held until the splice, the
    record of the connection, the group it belongs to."""

    direction = "?"

    def __init__(self, idle_timeout: float, access_log: Any, group: ConnGroup | None) -> None:
        self.idle_timeout = idle_timeout
        self.access_log = access_log
        self.group = group
        self.transport: asyncio.Transport | None = None
        self.peer: Peer = LOCAL_APP
        self.pending = bytearray()
        self.closed = False
        self.pipe: Pipe | None = None
        self.task: asyncio.Task[None] | None = None
        self.record = ExchangeRecord(self.direction, protocol="tcp")
        self.start = time.perf_counter()
        self._ended = False
        self._silent = False  # refused at the handshake: counted there, no access-log line

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.group is not None:
            self.group.add(self)

    def data_received(self, data: bytes) -> None:
        self.pending += data
        if len(self.pending) > PENDING_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone before the splice (after it, the pipe reports)."""
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        if self.pipe is None and not self._ended:
            if self.record.error is None and self.record.status == 0:
                self.record.error = "client_disconnected"
            self._end()

    def drain(self) -> None:
        """Shutting down: a byte stream has no point to stop at; it may finish until the
        drain time is over."""

    def splice_to(self, up: asyncio.Transport, early: bytes) -> None:
        """Join the client's transport with `up`."""
        assert self.transport is not None
        self.record.status = 200
        opened = getattr(self.access_log, "opened", None)
        if opened is not None:
            opened(self.record)
        self.pipe = splice(
            self.transport,
            up,
            idle_timeout=self.idle_timeout,
            a_pending=bytes(self.pending),
            b_pending=early,
            on_close=self._piped_closed,
        )
        self.pending.clear()

    def refuse(self, err: SidecarError) -> None:
        """Close the client's connection, recording why."""
        self.record.error = err.code
        self.record.status = err.status
        log.info("%s tcp connection refused: %s", self.direction, err.detail)
        if self.transport is not None:
            self.transport.close()

    def _piped_closed(self, pipe: Pipe) -> None:
        self.record.bytes_in = pipe.bytes_a_to_b
        self.record.bytes_out = pipe.bytes_b_to_a
        self.closed = True
        self._end()

    def _end(self) -> None:
        self._ended = True
        self.released()
        if self.group is not None:
            self.group.discard(self)
        if self._silent:
            return
        rec = self.record
        rec.method = "TCP"
        rec.ms = (time.perf_counter() - self.start) * 1000
        if self.access_log is not None:
            self.access_log.write(rec)

    def released(self) -> None:
        """The connection is over (routers forget it)."""


class TcpInbound(_TcpConn):
    """A peer's connection to an app declared `tcp`."""

    direction = "inbound"

    def __init__(
        self, router: InboundRouter, idle_timeout: float, access_log: Any, group: ConnGroup | None
    ) -> None:
        super().__init__(idle_timeout, access_log, group)
        self.router = router

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Check the peer and the policy, then dial the app."""
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        try:
            self.peer = self.router.accept(self)
        except SidecarError as e:
            self._silent = True
            refused = getattr(self.access_log, "refused", None)
            if refused is not None:
                refused("inbound", e.code)
            self.refuse(e)
            return
        rec = self.record
        rec.peer = self.peer.spiffe_id
        decision = self.router.policy.current.decide_connection(self.peer.spiffe_id)
        rec.decision = "allow" if decision.allowed else "deny"
        rec.rule = decision.rule
        rec.dry_run = decision.dry_run
        rec.audit = decision.audit
        if not decision.allowed:
            self.refuse(SidecarError("forbidden", decision.reason))
            return
        self.task = asyncio.get_running_loop().create_task(self._dial())

    async def _dial(self) -> None:
        app = self.router.cfg.app
        loop = asyncio.get_running_loop()
        try:
            up, proto = await asyncio.wait_for(
                loop.create_connection(TcpUpstream, app.host, app.port),
                self.router.cfg.connect_timeout,
            )
        except (OSError, TimeoutError) as e:
            self.refuse(SidecarError("app_unavailable", f"app is unavailable ({e})"))
            return
        if self.closed:
            up.abort()
            return
        self.splice_to(up, bytes(proto.early))

    def released(self) -> None:
        self.router.release(self)


class TcpOutbound(_TcpConn):
    """The app's connection to a `tcp` service (or a CONNECT tunnel to any service's
    `tcp` endpoints): mTLS to an endpoint, then bytes."""

    direction = "outbound"

    def __init__(
        self,
        pool: UpstreamPool,
        peer_id: str,
        idle_timeout: float,
        access_log: Any,
        group: ConnGroup | None,
        on_connected: Callable[[bool, SidecarError | None], bytes] | None = None,
    ) -> None:
        super().__init__(idle_timeout, access_log, group)
        self.pool = pool
        self.on_connected = on_connected  # CONNECT: what to tell the client (200, or the error)
        self.record.service = pool.label
        self.record.peer = peer_id
        self._admitted = False
        self.up: TcpUpstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Hold the client's bytes; dial the service."""
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        self.task = asyncio.get_running_loop().create_task(self._dial())

    async def _dial(self) -> None:
        pool = self.pool
        if not pool.admit():
            self._fail(SidecarError("overloaded", f"{pool.label}: too many connections"))
            return
        self._admitted = True
        tried: list[Any] = []
        last: SidecarError | None = None
        for _ in range(max(1, min(3, len(pool.endpoints)))):
            ep = pool.pick(None, tried)
            if ep is None:
                break
            try:
                up: Any = await pool.connect(ep)  # a TcpUpstream (the service's connector)
            except SidecarError as e:
                last = e
                if e.code == "overloaded":
                    break
                pool.failed(ep)
            except (OSError, TimeoutError) as e:
                log.warning("cannot connect to %s at %s: %s", pool.label, ep, e or type(e).__name__)
                pool.failed(ep)
                last = SidecarError("service_unavailable", f"{pool.label} is unavailable")
            else:
                if self.closed or up.transport is None or up.lost:
                    up.abort()
                    pool.discard(up)
                    if not self.closed:  # the endpoint hung up at once: tell the client
                        self._fail(SidecarError("upstream_reset", f"{pool.label} closed"))
                    return
                pool.answered(ep, 200)
                self.up = up
                self.record.upstream = str(ep)
                if self.on_connected is not None and self.transport is not None:
                    self.transport.write(self.on_connected(True, None))
                self.splice_to(up.transport, bytes(up.early))
                return
            tried.append(ep)
        self._fail(last or SidecarError("service_unavailable", f"{pool.label} has no endpoints"))

    def _fail(self, err: SidecarError) -> None:
        if self.on_connected is not None and self.transport is not None:
            self.transport.write(self.on_connected(False, err))
        self.refuse(err)

    def released(self) -> None:
        if self._admitted:
            self._admitted = False
            self.pool.done(False)
        if self.up is not None:
            self.pool.discard(self.up)
            self.up = None
