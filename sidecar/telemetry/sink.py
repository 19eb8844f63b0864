"""Where the engines report: every finished exchange, every connection refused at its
handshake. One `Telemetry` fans out to the access log and the metrics (either optional)."""

from __future__ import annotations

from typing import Protocol

from sidecar.telemetry.record import ExchangeRecord


class Recorder(Protocol):
    """Something that takes exchange records."""

    def write(self, rec: ExchangeRecord) -> None:
        """Record one exchange."""


class RefusalCounter(Protocol):
    """Something that counts refused connections."""

    def refused(self, direction: str, reason: str) -> None:
        """A connection was refused at (or right after) its handshake, for `reason`."""


class Telemetry:
    """The access log and the metrics, as one sink."""

    def __init__(
        self, access_log: Recorder | None = None, metrics: (Recorder | None) = None
    ) -> None:
        self.sinks = tuple(s for s in (access_log, metrics) if s is not None)
        self.metrics = metrics

    def write(self, rec: ExchangeRecord) -> None:
        """Hand one record to each sink."""
        for sink in self.sinks:
            sink.write(rec)

    def refused(self, direction: str, reason: str) -> None:
        """Count a refused connection (the access log has no line for it)."""
        counter = self.metrics
        if counter is not None and hasattr(counter, "refused"):
            counter.refused(direction, reason)
