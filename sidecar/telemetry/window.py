"""The last minute of traffic per peer and direction, for `sidecar stats` (pure; clock passed in).

Each (direction, peer) keeps sixty one-second slots: requests, failures (5xx and answers
the sidecar gave for want of an upstream), authorization denials and a latency histogram
with buckets 10 % apart (from 0.1 ms to about 10 minutes), so p50/p95/p99 are within 5 %
of the true value. Inbound, the peer is the caller's SPIFFE ID; outbound, the service
called. A slot is reused once it is a minute old.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

from sidecar.telemetry.record import ExchangeRecord

WINDOW = 60  # seconds
_GROWTH = 1.1
BOUNDS = tuple(0.1 * _GROWTH**k for k in range(165))  # 0.1 ms .. ~ 650 s
FAILED_CODES = frozenset(
    {
        "overloaded",
        "service_unavailable",
        "app_unavailable",
        "upstream_unavailable",
        "upstream_timeout",
        "upstream_reset",
        "bad_upstream_response",
        "unknown_service",
        "fault_abort",
        "no_jwt",
        "not_ready",
        "internal",
    }
)


class _Slot:
    __slots__ = ("second", "requests", "failures", "denials", "hist")

    def __init__(self) -> None:
        self.second = -1
        self.requests = 0
        self.failures = 0
        self.denials = 0
        self.hist: dict[int, int] = {}


class _Peer:
    __slots__ = ("slots",)

    def __init__(self) -> None:
        self.slots = [_Slot() for _ in range(WINDOW)]


def quantile(hist: dict[int, int], total: int, q: float) -> float | None:
    """The `q` quantile (0-1) of a histogram of bucket index -> count, in milliseconds."""
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            low = BOUNDS[index - 1] if index > 0 else 0.0
            high = BOUNDS[index] if index < len(BOUNDS) else BOUNDS[-1]
            return (low + high) / 2
    return BOUNDS[-1]


class Window:
    """Per (direction, peer): the last minute, one slot a second."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.peers: dict[tuple[str, str], _Peer] = {}
        self._hot: dict[tuple[str, str], tuple[int, _Slot]] = {}  # the slot written last
        self.refusals: dict[str, list[tuple[int, int]]] = {}  # direction -> (second, count)

    def _slot(self, key: tuple[str, str], second: int) -> _Slot:
        peer = self.peers.get(key)
        if peer is None:
            peer = self.peers[key] = _Peer()
        slot = peer.slots[second % WINDOW]
        if slot.second != second:
            slot.second = second
            slot.requests = slot.failures = slot.denials = 0
            slot.hist = {}
        return slot

    def write(self, rec: ExchangeRecord) -> None:
        """Count one finished exchange."""
        if rec.direction == "inbound":
            key = ("inbound", rec.peer or "unknown")
        else:
            key = ("outbound", rec.service or "unknown")
        second = int(self.clock())
        hot = self._hot.get(key)
        if hot is not None and hot[0] == second:  # this peer's slot for this second
            slot = hot[1]
        else:
            slot = self._slot(key, second)
            self._hot[key] = (second, slot)
        slot.requests += 1
        if rec.status >= 500 or rec.error in FAILED_CODES:
            slot.failures += 1
        if rec.decision == "deny":
            slot.denials += 1
        index = bisect.bisect_left(BOUNDS, rec.ms)
        slot.hist[index] = slot.hist.get(index, 0) + 1

    def refused(self, direction: str, reason: str) -> None:
        """A connection refused at its handshake (no peer to file it under)."""
        second = int(self.clock())
        marks = self.refusals.setdefault(direction, [])
        if marks and marks[-1][0] == second:
            marks[-1] = (second, marks[-1][1] + 1)
        else:
            marks.append((second, 1))
        while marks and marks[0][0] <= second - WINDOW:
            marks.pop(0)

    def snapshot(self) -> dict[str, Any]:
        """The last minute: a row per direction and peer, and refused handshakes."""
        now = int(self.clock())
        rows = []
        for (direction, peer), p in sorted(self.peers.items()):
            requests = failures = denials = 0
            hist: dict[int, int] = {}
            for slot in p.slots:
                if now - WINDOW < slot.second <= now:
                    requests += slot.requests
                    failures += slot.failures
                    denials += slot.denials
                    for k, v in slot.hist.items():
                        hist[k] = hist.get(k, 0) + v
            if requests == 0:
                continue
            rows.append(
                {
                    "direction": direction,
                    "peer": peer,
                    "requests": requests,
                    "success_rate": round((requests - failures) / requests, 4),
                    "rps": round(requests / WINDOW, 2),
                    "p50_ms": _round(quantile(hist, requests, 0.50)),
                    "p95_ms": _round(quantile(hist, requests, 0.95)),
                    "p99_ms": _round(quantile(hist, requests, 0.99)),
                    "authz_denials": denials,
                }
            )
        refused = {
            d: sum(n for s, n in marks if s > now - WINDOW) for d, marks in self.refusals.items()
        }
        return {"window_seconds": WINDOW, "peers": rows, "tls_handshake_failures": refused}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
