"""Where the engines report: every finished exchange, every connection refused at its
handshake. One `Telemetry` fans out to the access log, the metrics and the last-minute
window of `sidecar stats` (each optional)."""

from __future__ import annotations

from typing import Protocol

from sidecar.telemetry.record import ExchangeRecord


class Recorder(Protocol):
    """Something that takes exchange records."""

    def write(self, rec: ExchangeRecord) -> None:
        """Record one exchange."""


class Telemetry:
    """The sinks, as one."""

    def __init__(self, *sinks: Recorder | None) -> None:
        self.sinks = tuple(s for s in sinks if s is not None)
        self._counters = tuple(s for s in self.sinks if hasattr(s, "refused"))
        self._openers = tuple(s for s in self.sinks if hasattr(s, "opened"))
        self._one = self.sinks[0] if len(self.sinks) == 1 else None  # the common case

    def write(self, rec: ExchangeRecord) -> None:
        """Hand one record to each sink."""
        one = self._one
        if one is not None:
            one.write(rec)
            return
        for sink in self.sinks:
            sink.write(rec)

    def refused(self, direction: str, reason: str) -> None:
        """A connection refused at (or right after) its handshake (no access-log line)."""
        for counter in self._counters:
            counter.refused(direction, reason)

    def opened(self, rec: ExchangeRecord) -> None:
        """A TCP connection's bytes start to flow (it is written when it closes)."""
        for sink in self._openers:
            sink.opened(rec)
