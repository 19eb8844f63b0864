"""One endpoint of a destination, as the pool tracks it: its address, labels and weight, the
requests in flight to it, its kept-alive connections and its outlier state."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol


class Pooled(Protocol):
    """A connection a pool holds: an HTTP/1.1 `UpstreamConn`, an HTTP/2 `H2Upstream` or a
    TCP `TcpUpstream`. A Protocol, not a class: compiled code checks a class-typed value's
    class, and one pool's connections are of its own protocol only."""

    endpoint: Endpoint | None
    transport: Any  # (an asyncio transport, None before connection_made)

    def abort(self) -> None:
        """Close at once."""


class Endpoint:
    """An address the pool dials, and what it knows about it."""

    __slots__ = (
        "host",
        "port",
        "labels",
        "weight",
        "active",
        "idle",
        "conns",
        "consecutive_errors",
        "ejected_until",
        "ejections",
        "removed",
        "requests",
        "failures",
        "dialing",
    )

    def __init__(
        self, host: str, port: int, labels: Mapping[str, str] | None = None, weight: int = 1
    ) -> None:
        self.host = host
        self.port = port
        self.labels: Mapping[str, str] = labels or {}
        self.weight = weight
        self.active = 0  # requests in flight
        self.idle: list[Pooled] = []  # kept-alive connections, most recent last
        self.conns: set[Pooled] = set()
        self.consecutive_errors = 0
        self.ejected_until = 0.0  # loop time; ejected while now < this
        self.ejections = 0  # how many times in a row (the ejection time grows with it)
        self.removed = False  # no longer discovered: its connections drain
        self.requests = 0  # answered, all time
        self.failures = 0  # 5xx answers and failed connects, all time
        self.dialing: asyncio.Future[None] | None = None  # HTTP/2: the connection being dialled

    @property
    def key(self) -> tuple[str, int]:
        """What identifies the endpoint across discovery updates."""
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self}, weight={self.weight}, active={self.active})"

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether the endpoint carries every label in `labels` (a subset's selector)."""
        mine = self.labels
        return all(mine.get(k) == v for k, v in labels.items())
