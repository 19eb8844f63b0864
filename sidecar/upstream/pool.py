"""One destination (the app, or one outbound service): its endpoints, their kept-alive
connections, and the policies that choose among them and limit them.

Per request, the engine asks the pool to admit it (the circuit breaker's
`max_requests`), to pick an endpoint (subset, outlier state, balancer), then takes an idle
connection to that endpoint or dials one (past `max_connections` the request waits for a
released one, at most `max_pending` of them). Answers and failures are reported back, so
the outlier detector can eject an endpoint and the retry budget knows what is in flight.
A discovery update (`set_endpoints`) keeps what it still lists, with its state; endpoints
it drops take no new requests and their connections close once idle.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from sidecar.errors import SidecarError
from sidecar.trafficconfig import CircuitBreakerConfig, EndpointSpec, OutlierConfig
from sidecar.upstream import balancer
from sidecar.upstream.endpoint import Endpoint, Pooled
from sidecar.upstream.outlier import OutlierDetector
from sidecar.upstream.retry import RetryBudget, RetryPolicy

if TYPE_CHECKING:
    from sidecar.engines.http1.exchange import Upstream

log = logging.getLogger("sidecar.upstream")

# What a pool dials: an HTTP/1.1 `UpstreamConn`, an `H2Upstream`, a `TcpUpstream`.
Connect = Callable[["UpstreamPool", str, int], Awaitable[Any]]

UNLIMITED = CircuitBreakerConfig(1 << 30, 1 << 30, 1 << 30)


def _now() -> float:
    return time.monotonic()


class UpstreamPool:
    """Endpoints of one destination and connections to them, opened on demand."""

    def __init__(
        self,
        label: str,
        endpoints: Iterable[EndpointSpec | tuple[str, int]],
        connect: Connect,
        connect_timeout: float = 5.0,
        max_idle: int = 128,
        unavailable: str = "upstream_unavailable",
        retry: RetryPolicy | None = None,
        lb: str = "least_request",
        breaker: CircuitBreakerConfig | None = None,
        outlier: OutlierConfig | None = None,
        subsets: Mapping[str, Mapping[str, str]] | None = None,
        timeout: float | None = None,
        per_try_timeout: float | None = None,
        multiplexed: bool = False,
    ) -> None:
        self.label = label
        # HTTP/2: a connection carries many exchanges at once; the pool hands out streams.
        self.multiplexed = multiplexed
        self._connect = connect
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle  # per endpoint
        self.unavailable = unavailable  # the error code when no endpoint can be reached
        self.retry = retry or RetryPolicy()
        self.budget = RetryBudget(self.retry.cfg.budget_percent, self.retry.cfg.min_retries)
        self.balancer = balancer.make(lb)
        self.lb = lb
        self.breaker = breaker or UNLIMITED
        self.outlier = OutlierDetector(outlier or OutlierConfig(enabled=False))
        self.subsets: Mapping[str, Mapping[str, str]] = subsets or {}
        self.timeout = timeout  # whole request, all tries (None: no limit but per try)
        self.per_try_timeout = per_try_timeout  # None: the listener's upstream_timeout
        self.endpoints: list[Endpoint] = []
        self._by_subset: dict[str | None, list[Endpoint]] = {}
        self.conns: set[Pooled] = set()  # every open connection, idle or busy
        self.connecting = 0
        # Requests waiting at max_connections: for a connection to their endpoint, or a place.
        self.waiters: collections.deque[tuple[Endpoint, asyncio.Future[Pooled | None]]] = (
            collections.deque()
        )
        self.active_requests = 0
        self.overloaded = 0  # requests refused by the breaker, all time
        self.ejected_total = 0  # outlier ejections, all time
        self.clock: Callable[[], float] = _now
        self.set_endpoints(endpoints)

    # -- discovery -----------------------------------------------------------

    def set_endpoints(self, specs: Iterable[EndpointSpec | tuple[str, int]]) -> None:
        """Replace the endpoint set; what stays keeps its state, what goes drains."""
        old = {ep.key: ep for ep in self.endpoints}
        new: list[Endpoint] = []
        for spec in specs:
            if isinstance(spec, EndpointSpec):
                host, port = spec.address.host, spec.address.port
                labels, weight = spec.labels, spec.weight
            else:
                (host, port), labels, weight = spec, {}, 1
            ep = old.pop((host, port), None)
            if ep is None:
                ep = Endpoint(host, port, labels, weight)
            else:
                ep.labels, ep.weight = labels, weight
            new.append(ep)
        for gone in old.values():
            gone.removed = True
            for conn in gone.idle:
                conn.abort()
            gone.idle.clear()
        self.endpoints = new
        self._by_subset = {}

    def candidates(self, subset: str | None) -> list[Endpoint]:
        """The endpoints of `subset` (None: all)."""
        got = self._by_subset.get(subset)
        if got is None:
            if subset is None:
                got = list(self.endpoints)
            else:
                labels = self.subsets.get(subset, {})
                got = [ep for ep in self.endpoints if ep.matches(labels)]
            self._by_subset[subset] = got
        return got

    # -- a request -------------------------------------------------------------

    def admit(self) -> bool:
        """Whether one more request may be in flight (the breaker's `max_requests`)."""
        if self.active_requests >= self.breaker.max_requests:
            self.overloaded += 1
            return False
        self.active_requests += 1
        self.budget.active_requests = self.active_requests
        return True

    def done(self, retried: bool) -> None:
        """An admitted request is over (`retried`: it had started a retry)."""
        self.active_requests -= 1
        self.budget.active_requests = self.active_requests
        if retried:
            self.budget.active_retries -= 1

    def pick(self, subset: str | None, tried: Sequence[Endpoint] = ()) -> Endpoint | None:
        """An endpoint for the next try: in service, not tried yet if another is left."""
        cands = self.candidates(subset)
        if len(cands) == 1:  # (one endpoint: it is the pick, ejected or not, tried or not)
            return cands[0]
        if not cands:
            return None
        usable = self.outlier.usable(cands, self.clock())
        if tried:
            fresh = [ep for ep in usable if ep not in tried]
            usable = fresh or usable
        return self.balancer.pick(usable)

    def take_idle(self, ep: Endpoint) -> Upstream | None:
        """A kept-alive connection to `ep`, if one is idle and open (HTTP/2: a new stream on
        a connection with room for one)."""
        idle = ep.idle
        if self.multiplexed:
            shared: list[Any] = idle  # HTTP/2 connections (engines.h2.upstream.H2Upstream)
            for conn in shared:
                if conn.usable():
                    return conn.open_stream()
            return None
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return cast("Upstream", conn)  # (HTTP/1.1: the connection carries the exchange)
        return None

    async def connect(self, ep: Endpoint) -> Upstream:
        """A new connection to `ep` (or, at `max_connections`, an idle one to any endpoint, or
        the next one released).

        SidecarError `overloaded` when too many wait already, or the connector's own
        refusal; OSError or TimeoutError when `ep` cannot be reached."""
        if self.multiplexed:
            return await self._stream_to(ep)
        while len(self.conns) + self.connecting >= self.breaker.max_connections:
            victim = self._idle_elsewhere(ep)  # room is made by closing an idle connection
            if victim is not None:
                self._drop(victim)
                continue
            if len(self.waiters) >= self.breaker.max_pending:
                self.overloaded += 1
                raise SidecarError("overloaded", f"{self.label}: too many requests waiting")
            fut: asyncio.Future[Pooled | None] = asyncio.get_running_loop().create_future()
            waiter = (ep, fut)
            self.waiters.append(waiter)
            try:
                handed = await asyncio.wait_for(fut, self.connect_timeout)
            except TimeoutError:
                self.overloaded += 1
                raise SidecarError(
                    "overloaded", f"{self.label}: no connection free in time"
                ) from None
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
            if handed is not None:
                if handed.transport is not None and not handed.transport.is_closing():
                    return cast("Upstream", handed)
                self._drop(handed)
            # a place is free (or the handed connection closed on the way): look again
        self.connecting += 1
        try:
            conn = await asyncio.wait_for(
                self._connect(self, ep.host, ep.port), self.connect_timeout
            )
        except BaseException:
            self.connecting -= 1
            self._wake_one()  # the place this dial held is free again
            raise
        self.connecting -= 1
        conn.endpoint = ep
        self.conns.add(conn)
        ep.conns.add(conn)
        return conn

    async def _stream_to(self, ep: Endpoint) -> Upstream:  # (an H2UpstreamStream)
        """A stream on a connection to `ep`: one with room, the one being dialled (requests
        arriving together share one dial), or a new one (at most `max_connections`)."""
        shared: list[Any] = ep.idle  # HTTP/2 connections (engines.h2.upstream.H2Upstream)
        while True:
            for conn in shared:
                if conn.usable():
                    return conn.open_stream()
            dialing = ep.dialing
            if dialing is None:
                break
            await asyncio.shield(dialing)  # its failure is ours too
        if len(self.conns) + self.connecting >= self.breaker.max_connections:
            self.overloaded += 1
            raise SidecarError("overloaded", f"{self.label}: too many connections")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ep.dialing = fut
        self.connecting += 1
        try:
            conn = await asyncio.wait_for(
                self._connect(self, ep.host, ep.port), self.connect_timeout
            )
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: whoever waits gets it raised, nobody else cares
            raise
        finally:
            self.connecting -= 1
            ep.dialing = None
        conn.endpoint = ep
        self.conns.add(conn)
        ep.conns.add(conn)
        ep.idle.append(conn)  # shared while it has room for streams
        fut.set_result(None)
        return conn.open_stream()

    # -- outcomes --------------------------------------------------------------

    def answered(self, ep: Endpoint, status: int) -> None:
        """An answer's status came back from `ep` (5xx counts against it)."""
        ep.requests += 1
        if status >= 500:
            self.failed(ep)
        else:
            self.outlier.success(ep)

    def failed(self, ep: Endpoint) -> None:
        """`ep` could not be reached, reset, timed out or answered 5xx."""
        if self.outlier.failure(ep, self.endpoints, self.clock()):
            self.ejected_total += 1
            log.warning(
                "%s: endpoint %s ejected for %.0f s after %d errors in a row",
                self.label,
                ep,
                ep.ejected_until - self.clock(),
                self.outlier.cfg.consecutive_errors,
            )

    # -- connections -------------------------------------------------------------

    def release(self, up: Upstream) -> None:
        """A healthy connection whose exchange is over: to a request waiting for its endpoint,
        else idle (closed instead when a request waits for another endpoint: its place)."""
        if self.multiplexed:
            return  # an HTTP/2 stream never used: its connection stays shared
        conn = cast(Pooled, up)  # (an HTTP/1.1 pool: the connection is its own upstream)
        ep = conn.endpoint
        if self.waiters:  # (none, the common case: no pass over them)
            for waiter in self.waiters:
                wep, fut = waiter
                if wep is ep and not fut.done():
                    self.waiters.remove(waiter)
                    fut.set_result(conn)
                    return
            if any(not fut.done() for _, fut in self.waiters):
                self._drop(conn)  # its place goes to a request for another endpoint
                return
        if ep is not None and not ep.removed and len(ep.idle) < self.max_idle:
            ep.idle.append(conn)
        else:
            conn.abort()

    def discard(self, conn: Pooled) -> None:
        """Forget a connection that closed; a request waiting for a place may dial."""
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        ep = conn.endpoint
        if ep is not None:
            ep.conns.discard(conn)
            try:
                ep.idle.remove(conn)
            except ValueError:
                pass
        self._wake_one()

    def _wake_one(self) -> None:
        """A place is free: the first request waiting for one may dial."""
        while self.waiters:
            _, fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def _drop(self, conn: Pooled) -> None:
        self.discard(conn)
        conn.abort()

    def _idle_elsewhere(self, ep: Endpoint) -> Pooled | None:
        for other in self.endpoints:
            if other is not ep and other.idle:
                return other.idle.pop(0)  # the oldest
        return None

    def abort_where(self, predicate: Callable[[Any], bool]) -> int:
        """Abort every connection (idle or busy) for which `predicate` holds. (`Any`: the
        pool's connections are of any protocol, and a compiled caller's lambda checks the
        type its parameter is given.)"""
        doomed = [c for c in self.conns if predicate(c)]
        for c in doomed:
            c.abort()
        return len(doomed)

    def close(self) -> None:
        """Close every idle connection."""
        for ep in self.endpoints:
            for conn in ep.idle:
                conn.abort()
            ep.idle.clear()

    def describe(self) -> dict[str, Any]:
        """What `GET /endpoints` shows for this destination."""
        now = self.clock()
        return {
            "lb": self.lb,
            "active_requests": self.active_requests,
            "connections": len(self.conns),
            "overloaded": self.overloaded,
            "endpoints": [
                {
                    "address": str(ep),
                    "labels": dict(ep.labels),
                    "weight": ep.weight,
                    "healthy": not self.outlier.ejected(ep, now),
                    "ejected_for": round(max(0.0, ep.ejected_until - now), 1),
                    "ejections": ep.ejections,
                    "active_requests": ep.active,
                    "connections": len(ep.conns),
                    "requests": ep.requests,
                    "failures": ep.failures,
                }
                for ep in self.endpoints
            ],
        }
