"""When the sidecar sends a request again on its own.

Only when a kept-alive connection turns out to be dead (the app closed it while
it was idle, or after it took the request, with no byte of an answer), and only
a request that may run twice: an idempotent method without a body (RFC 9110
section 9.2.2), not already retried. POST, PATCH and the rest reach the app at
most once.
"""

from __future__ import annotations

from dataclasses import dataclass

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The methods that may be sent again, and the rule above."""

    methods: frozenset[bytes] = IDEMPOTENT

    def after_stale_connection(self, method: bytes, has_body: bool, retried: bool) -> bool:
        """Whether a request a reused connection lost (no byte answered) goes out again."""
        return not has_body and not retried and method in self.methods
