"""Outlier detection, pure: the ejection clock of a destination's endpoints.

An endpoint whose answers are 5xx, or whose connects fail, `consecutive_errors` times in a
row is ejected for `base_ejection_time` times the number of its ejections in a row (the
count falls by one for each `interval` it spends back in service without being ejected
again). At most `max_ejection_percent` of the endpoints are ejected at once (at least one
of two or more may be); if every candidate of a request is ejected, all of them are used
(Envoy's panic mode): an outage is never made total by the detector itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.trafficconfig import OutlierConfig
from sidecar.upstream.endpoint import Endpoint


class OutlierDetector:
    """Counts errors per endpoint and decides ejections; times are loop times (seconds)."""

    def __init__(self, cfg: OutlierConfig) -> None:
        self.cfg = cfg
        self.latest_until = 0.0  # when the last ejection ends (nothing is out after it)

    def ejected(self, ep: Endpoint, now: float) -> bool:
        """Whether `ep` is out of service at `now`."""
        return now < ep.ejected_until

    def success(self, ep: Endpoint) -> None:
        """A good answer: the run of errors is over."""
        ep.consecutive_errors = 0

    def failure(self, ep: Endpoint, all_endpoints: Sequence[Endpoint], now: float) -> bool:
        """A 5xx answer or a failed connect; True if it ejected `ep` now."""
        ep.failures += 1
        if not self.cfg.enabled:
            return False
        ep.consecutive_errors += 1
        if ep.consecutive_errors < self.cfg.consecutive_errors or self.ejected(ep, now):
            return False
        out = sum(1 for e in all_endpoints if self.ejected(e, now))
        if out + 1 > self.max_ejected(len(all_endpoints)):
            return False
        if ep.ejected_until and now > ep.ejected_until:  # back in service for a while
            ep.ejections = max(0, ep.ejections - int((now - ep.ejected_until) / self.cfg.interval))
        ep.ejections += 1
        ep.ejected_until = now + self.cfg.base_ejection_time * ep.ejections
        self.latest_until = max(self.latest_until, ep.ejected_until)
        ep.consecutive_errors = 0
        return True

    def max_ejected(self, n: int) -> int:
        """How many of `n` endpoints may be out at once."""
        if n < 2:
            return 0
        limit = int(n * self.cfg.max_ejection_percent / 100)
        return min(n - 1, max(1, limit)) if self.cfg.max_ejection_percent > 0 else 0

    def usable(self, candidates: Sequence[Endpoint], now: float) -> Sequence[Endpoint]:
        """The candidates in service; all of them when none is (panic)."""
        if now >= self.latest_until:  # nobody is ejected: the common case costs nothing
            return candidates
        live = [ep for ep in candidates if now >= ep.ejected_until]
        return live or candidates
