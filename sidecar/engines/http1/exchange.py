"""One HTTP/1.1 request and its answer on a downstream connection: the state both ends share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sidecar.engines.http1.framing import NO_BODY, Framing, Headers
from sidecar.telemetry.record import ExchangeRecord
from sidecar.upstream.retry import CONNECT_FAILURE, replayable

if TYPE_CHECKING:
    from sidecar.engines.http1.upstream import ResponseSink
    from sidecar.upstream.endpoint import Endpoint
    from sidecar.upstream.pool import UpstreamPool


class Upstream(Protocol):
    """What carries an exchange upstream: an HTTP/1.1 `UpstreamConn`, or an HTTP/2 stream
    (`engines.h2.upstream.H2UpstreamStream`). A Protocol, not a class: compiled code checks
    a class-typed value's class."""

    endpoint: Endpoint | None
    write_paused: bool  # the request's body is held until the upstream drains

    def send_request(self, ex: Exchange, down: ResponseSink, response_timeout: float) -> None:
        """Send the request's head and what body has arrived."""

    def send_body(self, ex: Exchange, data: bytes) -> None:
        """More of the request's body."""

    def end_request(self, ex: Exchange) -> None:
        """The request's body is complete."""

    def pause_reading(self) -> None:
        """Stop reading the answer (the client is slow)."""

    def resume_reading(self) -> None:
        """Read the answer again."""

    def detach(self, ex: Exchange) -> None:
        """`ex` is done with this upstream (kept alive or closed)."""

    def cancel(self) -> None:
        """The client went away: give up the exchange."""

    def abort(self) -> None:
        """Close at once."""


@dataclass(eq=False, slots=True, init=False)
class Exchange:
    """A request as parsed (method, target, headers, framing), its body until an upstream
    connection takes it, and how far its answer has got. (Its own `__init__`, as
    `ExchangeRecord`'s: one is made per request.)"""

    method: bytes
    target: bytes
    headers: Headers
    version: str
    keep_alive: bool
    record: ExchangeRecord
    framing: Framing = NO_BODY
    start: float = field(default_factory=time.perf_counter)
    body: list[bytes] = field(default_factory=list)  # buffered until an upstream is attached
    buffered: int = 0
    body_done: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    pool: UpstreamPool | None = None
    head: bytes = b""  # the request head the router built (no framing, no final CRLF)
    upstream: Upstream | None = None
    status: int = 0
    response: Framing = NO_BODY  # how the answer is framed to the client
    response_started: bool = False
    finished: bool = False
    retried: bool = False
    continue_pending: bool = False  # `100 Continue` is owed once this exchange is active
    # Set by the router: the subset of the pool's endpoints, an injected delay (seconds).
    subset: str | None = None
    delay: float = 0.0
    # Tries: the endpoints given up on, the retries made, whether the pool counts this
    # exchange (admitted) and its retries (retrying), the deadline of all tries (loop time).
    tried: list[Endpoint] = field(default_factory=list)
    retries: int = 0
    admitted: bool = False
    retrying: bool = False
    deadline_at: float = 0.0
    rerouted: bool = False
    upgrade: bytes = b""  # the protocol a WebSocket upgrade asks for (b"websocket")
    # Header names the request's Connection header lists: hop-by-hop, never forwarded
    # (HTTP/2 has no Connection header).
    drop: frozenset[bytes] = frozenset()

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        version: str,
        keep_alive: bool,
        record: ExchangeRecord,
        framing: Framing = NO_BODY,
        body_done: bool = False,
        drop: frozenset[bytes] = frozenset(),
        continue_pending: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.record = record
        self.framing = framing
        self.start = time.perf_counter()
        self.body = []
        self.buffered = 0
        self.body_done = body_done
        self.bytes_in = 0
        self.bytes_out = 0
        self.pool = None
        self.head = b""
        self.upstream = None
        self.status = 0
        self.response = NO_BODY
        self.response_started = False
        self.finished = False
        self.retried = False
        self.continue_pending = continue_pending
        self.subset = None
        self.delay = 0.0
        self.tried = []
        self.retries = 0
        self.admitted = False
        self.retrying = False
        self.deadline_at = 0.0
        self.rerouted = False
        self.upgrade = b""
        self.drop = drop

    @property
    def has_body(self) -> bool:
        """Whether the request carries a body (so it cannot be replayed)."""
        return self.framing.has_body

    def may_retry(self, cause: str, ep: Endpoint | None, now: float) -> bool:
        """Whether this exchange may go out once more after `cause` (a status, `reset`,
        `timeout`, `connect-failure`) at `ep`; if so the try is counted (attempts, the
        pool's budget, the access log) and `ep` is avoided next."""
        pool = self.pool
        if pool is None or self.finished:
            return False
        policy = pool.retry
        if self.retries >= policy.cfg.attempts:
            return False
        if cause == CONNECT_FAILURE:
            if not policy.retries_on(cause):
                return False
        elif not replayable(self.method, self.has_body):
            return False
        elif not cause.isdigit() and not policy.retries_on(cause):
            return False
        if self.deadline_at and now >= self.deadline_at:
            return False
        if not self.retrying:
            if not pool.budget.allows():
                return False
            pool.budget.active_retries += 1
            self.retrying = True
        self.retries += 1
        if ep is not None:
            self.tried.append(ep)
            self.record.retries += (f"{ep} {cause}",)
        return True

    def finished_record(self) -> ExchangeRecord:
        """The record, completed with what the engine saw (method, status, time, bytes, and
        the endpoint that answered when there was a choice)."""
        rec = self.record
        rec.method = self.method.decode("latin-1")
        if rec.path is None:
            rec.path = self.target.split(b"?", 1)[0].decode("latin-1")
        rec.status = self.status
        rec.ms = (time.perf_counter() - self.start) * 1000
        rec.bytes_in = self.bytes_in
        rec.bytes_out = self.bytes_out
        up = self.upstream
        if up is not None and up.endpoint is not None and self.pool is not None:
            if len(self.pool.endpoints) > 1 or rec.retries:
                rec.upstream = str(up.endpoint)
        return rec
