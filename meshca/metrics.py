"""Prometheus metrics of the CA (`meshca_ca_*`): outcomes counted as they happen, state per scrape.

The server counts each outcome where it is decided (`issued`, `refused`, `enrollment`,
`rate_limited`, `jwt_svid`): plain integers in dictionaries, no lock and no prometheus-client
metric objects on the request path (everything runs on the event loop). The samples are built
only when Prometheus scrapes: `CaMetrics` is a custom collector in a registry of its own, so
nothing else (the process collector, another library's metrics) appears on the CA's page.
The gauges are read at scrape time from the CA's current `Authority`, and from the ledger's
counts, which the server reads on a thread of their own before each scrape (`ledger`): no I/O
here. Every label value comes from a fixed set, so the number of series stays bounded.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from meshca import pki
from meshca.authority import Authority
from meshca.rotation_plan import STAGES

# The credential an issuance was authenticated with (`credential` label).
JOIN_TOKEN, K8S_TOKEN, MTLS_RENEWAL = "join_token", "k8s_token", "mtls_renewal"
CREDENTIALS = (JOIN_TOKEN, K8S_TOKEN, MTLS_RENEWAL)

# Every JSON error code the API answers with (`reason` label): the codes of meshca.errors'
# classes, the codes handlers and modules pass to them, and the server's names for aiohttp's
# own errors. A code missing here is counted as `other` (tests/meshca/test_metrics.py checks
# that every code in meshca/ is listed).
REFUSAL_REASONS = (
    "bad_admission_review",
    "bad_certificate",
    "bad_csr",
    "bad_csr_signature",
    "bad_json",
    "bad_key_type",
    "bad_request",
    "forbidden",
    "headers_too_large",
    "http_error",
    "internal",
    "invalid_token",
    "method_not_allowed",
    "missing_credential",
    "not_found",
    "rate_limited",
    "revoked",
    "revoked_identity",
    "state",
    "too_large",
    "unauthenticated",
    "unavailable",
)
OTHER = "other"

# Enrollment latency buckets, seconds: 1 ms (a refusal) .. 10 s (the ledger's busy timeout).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ISSUED, REFUSED = "issued", "refused"
OUTCOMES = (ISSUED, REFUSED)


@dataclass(frozen=True)
class LedgerCounts:
    """What a scrape reports from the ledger (read by the server on a thread)."""

    certificates: int  # rows of the certificates table, the CA's own serving certificates too
    revoked_serials: int  # revoked and not yet expired: what /v1/bundle carries


class _Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(DURATION_BUCKETS, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def root_labels(roots: tuple[x509.Certificate, ...]) -> list[str]:
    """A distinct `root` label per root: its subject CN, or its serial when it has no CN or
    shares it with another (two series with one label set would spoil the whole scrape)."""
    names = []
    for cert in roots:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        names.append(str(cns[0].value) if cns else "")
    return [
        name if name and names.count(name) == 1 else pki.serial_hex(cert)
        for name, cert in zip(names, roots, strict=True)
    ]


class CaMetrics(Collector):
    """The CA's counters (bumped by the server) and the collector that reports them."""

    def __init__(self, authority: Callable[[], Authority]) -> None:
        self._authority = authority
        self.issuances = dict.fromkeys(CREDENTIALS, 0)
        self.refusals = dict.fromkeys(REFUSAL_REASONS, 0)
        self.rate_limits = 0
        self.jwt_svids = 0
        self.durations = {outcome: _Histogram() for outcome in OUTCOMES}
        self.ledger: LedgerCounts | None = None  # None: not read (yet), or the read failed
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- counting (event loop only) ---------------------------------------

    def issued(self, credential: str) -> None:
        """A certificate was issued to a workload authenticated by `credential`."""
        self.issuances[credential] += 1

    def refused(self, reason: str) -> None:
        """The API answered with the error code `reason`."""
        key = reason if reason in self.refusals else OTHER
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def rate_limited(self) -> None:
        """A request was refused by a rate limit (per identity or per source address)."""
        self.rate_limits += 1

    def jwt_svid(self) -> None:
        """A JWT-SVID was issued."""
        self.jwt_svids += 1

    def enrollment(self, outcome: str, seconds: float) -> None:
        """An enrollment request was answered (`issued` or `refused`) after `seconds`."""
        self.durations[outcome].observe(seconds)

    # -- scrape ------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Every `meshca_ca_*` family, built now from the counters and the current state."""
        issued = CounterMetricFamily(
            "meshca_ca_issuances",
            "Workload certificates issued, by the credential the request was authenticated with.",
            labels=["credential"],
        )
        for credential, n in self.issuances.items():
            issued.add_metric([credential], n)
        yield issued

        refused = CounterMetricFamily(
            "meshca_ca_refusals",
            "Requests the CA answered with an error, by the JSON error code it answered.",
            labels=["reason"],
        )
        for reason, n in sorted(self.refusals.items()):
            refused.add_metric([reason], n)
        yield refused

        yield CounterMetricFamily(
            "meshca_ca_rate_limited",
            "Requests refused by a rate limit (per identity, or per source address after "
            "failed authentications).",
            value=self.rate_limits,
        )
        yield CounterMetricFamily("meshca_ca_jwt_svids", "JWT-SVIDs issued.", value=self.jwt_svids)

        duration = HistogramMetricFamily(
            "meshca_ca_enrollment_duration_seconds",
            "Time from the start of an enrollment request to its answer, by outcome.",
            labels=["outcome"],
            unit="seconds",
        )
        for outcome, hist in self.durations.items():
            duration.add_metric([outcome], hist.buckets(), hist.total)
        yield duration

        yield from self._state_gauges(self._authority())

        if self.ledger is not None:
            yield GaugeMetricFamily(
                "meshca_ca_revoked_serials",
                "Revoked certificates not yet expired (the serials /v1/bundle carries).",
                value=self.ledger.revoked_serials,
            )
            yield GaugeMetricFamily(
                "meshca_ca_ledger_certificates",
                "Rows in the ledger's certificates table (every certificate issued, the CA's "
                "own serving certificates included).",
                value=self.ledger.certificates,
            )

    def _state_gauges(self, authority: Authority) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "meshca_ca_intermediate_not_after_seconds",
            "Expiry of the issuing intermediate, in seconds since the Unix epoch.",
            value=authority.intermediate.not_valid_after_utc.timestamp(),
            unit="seconds",
        )
        roots = GaugeMetricFamily(
            "meshca_ca_root_not_after_seconds",
            "Expiry of each trusted root, in seconds since the Unix epoch.",
            labels=["root"],
            unit="seconds",
        )
        for label, cert in zip(root_labels(authority.roots), authority.roots, strict=True):
            roots.add_metric([label], cert.not_valid_after_utc.timestamp())
        yield roots
        stage = GaugeMetricFamily(
            "meshca_ca_root_rotation_stage",
            "The root rotation stage: 1 for the current one, 0 for the others.",
            labels=["stage"],
        )
        current = authority.state.root_rotation.get("stage")
        for s in STAGES:
            stage.add_metric([str(s)], 1 if s == current else 0)
        yield stage
        yield GaugeMetricFamily(
            "meshca_ca_bundle_sequence",
            "Sequence number of the trust bundle (bumps whenever the bundle changes).",
            value=authority.state.sequence,
        )
