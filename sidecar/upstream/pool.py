"""Kept-alive connections to one destination (the app, or one outbound service).

A request takes an idle connection when there is one (no task, no await: the
common case) or a new one, dialled through the pool's `connect` at the
endpoint its balancer names; a dial that fails moves on to the next endpoint.
The pool also carries the destination's retry policy, which the engine asks
when a reused connection dies before answering.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sidecar.errors import SidecarError
from sidecar.upstream.balancer import Endpoint, RoundRobin
from sidecar.upstream.retry import RetryPolicy

if TYPE_CHECKING:
    from sidecar.engines.http1.upstream import UpstreamConn

log = logging.getLogger("sidecar.upstream")

Connect = Callable[["UpstreamPool", str, int], Awaitable["UpstreamConn"]]


class UpstreamPool:
    """Idle and busy connections to one destination, opened on demand."""

    def __init__(
        self,
        label: str,
        endpoints: list[Endpoint],
        connect: Connect,
        connect_timeout: float = 5.0,
        max_idle: int = 128,
        unavailable: str = "upstream_unavailable",
        retry: RetryPolicy | None = None,
    ) -> None:
        self.label = label
        self.balancer = RoundRobin(endpoints)
        self.retry = retry or RetryPolicy()
        self._connect = connect
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.unavailable = unavailable  # the error code when no endpoint can be reached
        self.idle: list[UpstreamConn] = []
        self.conns: set[UpstreamConn] = set()

    def take_idle(self) -> UpstreamConn | None:
        """A kept-alive connection, if one is idle and open."""
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect_new(self) -> UpstreamConn:
        """A new connection; SidecarError (`unavailable`, or the connector's own refusal)."""
        last = "no endpoints"
        for host, port in self.balancer.candidates():
            try:
                conn = await asyncio.wait_for(self._connect(self, host, port), self.connect_timeout)
                self.conns.add(conn)
                return conn
            except SidecarError:
                raise
            except (OSError, TimeoutError) as e:
                last = f"{type(e).__name__}"
                log.warning("cannot connect to %s at %s:%d: %s", self.label, host, port, e)
        raise SidecarError(self.unavailable, f"{self.label} is unavailable ({last})")

    def release(self, conn: UpstreamConn) -> None:
        """Return a healthy, idle connection."""
        if len(self.idle) < self.max_idle and conn.transport is not None:
            self.idle.append(conn)
        else:
            conn.abort()

    def discard(self, conn: UpstreamConn) -> None:
        """Forget a connection that closed."""
        self.conns.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def abort_where(self, predicate: Callable[[UpstreamConn], bool]) -> int:
        """Abort every connection (idle or busy) for which `predicate` holds."""
        doomed = [c for c in self.conns if predicate(c)]
        for c in doomed:
            c.abort()
        return len(doomed)

    def close(self) -> None:
        """Close every idle connection."""
        for conn in self.idle:
            conn.abort()
        self.idle.clear()
