"""What every engine on a listener shares: limits, deadlines, and the listener's connection group.

An engine is the protocol a listener speaks (today HTTP/1.1, `engines.http1`);
the listener (`meshca.listener`) accepts sockets, finishes TLS and hands each
connection to a protocol object the engine makes. Whatever the engine, its
connections have a deadline swept here, belong to a `ConnGroup` (the listener's
connection limit and the drain on shutdown), and obey the listener's `Limits`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("sidecar.engines")

SWEEP_INTERVAL = 0.25  # seconds; deadlines are checked this often


@dataclass(frozen=True)
class Limits:
    """Per-listener limits and timeouts (seconds)."""

    header_timeout: float = 10.0
    idle_timeout: float = 300.0
    upstream_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int | None = None


class Timed(Protocol):
    """Something with a deadline: `on_deadline` runs once `deadline` (loop time) passes."""

    deadline: float
    on_deadline: Callable[[], None] | None


class Deadlines:
    """One periodic sweep checks every connection's deadline.

    Setting a deadline is an attribute write, so timeouts cost nothing per
    request; a timer per request (arm, cancel, re-arm) cost more than the
    header rewrite. Resolution is SWEEP_INTERVAL.
    """

    def __init__(self) -> None:
        self.members: set[Timed] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, conn: Timed) -> None:
        """Watch `conn`."""
        self.members.add(conn)
        loop = asyncio.get_running_loop()
        if self._handle is None or self._loop is not loop:  # (a new loop: tests run several)
            self._loop = loop
            self._handle = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def discard(self, conn: Timed) -> None:
        """Stop watching `conn`."""
        self.members.discard(conn)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.members):
            fn = conn.on_deadline
            if fn is not None and now >= conn.deadline:
                conn.on_deadline = None
                try:
                    fn()
                except Exception:  # a sweep must never die
                    log.exception("deadline handler failed")
        self._handle = loop.call_later(SWEEP_INTERVAL, self._sweep) if self.members else None


DEADLINES = Deadlines()


def refuse_connection(
    direction: str, sink: object, transport: asyncio.BaseTransport, code: str, detail: str
) -> None:
    """A connection the router refused right after its handshake: logged, counted by the
    sink's `refused` (the metrics), closed without an answer."""
    log.info("%s connection refused: %s", direction, detail)
    refused = getattr(sink, "refused", None)
    if refused is not None:
        refused(direction, code)
    transport.close()


class Member(Protocol):
    """A downstream connection as its group sees it."""

    transport: asyncio.Transport | None

    def drain(self) -> None:
        """Close now if idle, else after the exchange in progress."""


class ConnGroup:
    """The open connections of one listener: each end is reported (for the listener's
    connection limit) and all of them drain together on shutdown."""

    def __init__(self, on_release: Callable[[], None] | None = None) -> None:
        self.conns: set[Member] = set()
        self.on_release = on_release
        self.draining = False
        self._empty: asyncio.Event | None = None

    def add(self, conn: Member) -> None:
        """A connection is up (its TLS handshake done)."""
        self.conns.add(conn)

    def forget(self, conn: Member) -> None:
        """`conn` handed its connection to another protocol (which adds itself): the
        connection is not gone, its place is kept."""
        self.conns.discard(conn)

    def discard(self, conn: Member) -> None:
        """A connection is gone."""
        if conn in self.conns:
            self.conns.remove(conn)
            if self.on_release is not None:
                self.on_release()
            if self._empty is not None and not self.conns:
                self._empty.set()

    def drain(self) -> None:
        """Close idle connections now; busy ones after their current response, which
        says `Connection: close`."""
        self.draining = True
        for conn in list(self.conns):
            conn.drain()

    async def wait_closed(self, timeout: float) -> int:
        """Wait until every connection has closed, at most `timeout` seconds; then close
        what is left (a request still running is cut off). The number cut off."""
        if self.conns:
            self._empty = asyncio.Event()
            try:
                await asyncio.wait_for(self._empty.wait(), timeout)
            except TimeoutError:
                pass
        left = len(self.conns)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        return left
