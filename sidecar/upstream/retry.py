"""When the sidecar sends a request again on its own, pure.

A request goes out again only when that is safe:
- it never left the sidecar (the connect failed), whatever its method and body; or
- it is idempotent (RFC 9110 9.2.2) with no body, and no byte of its answer has
  reached the client: after a reset, a per-try timeout or an answer whose status
  the service retries on (that answer is dropped, never forwarded).
POST, PATCH and the rest, once sent, reach the app at most once. Each service allows
`attempts` retries, and the retries in flight are capped by a budget (a share of the
requests in flight, with a small floor), so that retries cannot multiply an outage.
A kept-alive connection found dead before any answer (the app closed it while idle)
is always retried once for a safe request: it was never a real try.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.trafficconfig import RetryConfig

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

CONNECT_FAILURE = "connect-failure"
RESET = "reset"
TIMEOUT = "timeout"  # a per-try timeout: retried on `reset`, `gateway-error` or `5xx`


def replayable(method: bytes, has_body: bool) -> bool:
    """Whether a request that was sent may be sent again."""
    return not has_body and method in IDEMPOTENT


@dataclass(slots=True)
class RetryBudget:
    """Retries in flight against requests in flight, for one destination."""

    percent: float
    floor: int
    active_requests: int = 0
    active_retries: int = 0

    def allows(self) -> bool:
        """Whether one more retry may start now."""
        cap = max(self.floor, self.active_requests * self.percent / 100)
        return self.active_retries < cap


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A destination's retry settings, and the rule above."""

    cfg: RetryConfig = RetryConfig(attempts=0)

    def retries_on(self, cause: str) -> bool:
        """Whether `cause` (connect-failure, reset, timeout) is one this service retries."""
        on = self.cfg.retry_on
        if cause == TIMEOUT:
            return bool(on & {RESET, "gateway-error", "5xx"})
        return cause in on

    def retries_status(self, status: int) -> bool:
        """Whether an answer with `status` is dropped and the request sent again."""
        on = self.cfg.retry_on
        if status in self.cfg.statuses:
            return True
        if "5xx" in on and status >= 500:
            return True
        return "gateway-error" in on and status in (502, 503, 504)

    def after_stale_connection(self, method: bytes, has_body: bool, retried: bool) -> bool:
        """Whether a request a reused connection lost (no byte answered) goes out again."""
        return not retried and replayable(method, has_body)
