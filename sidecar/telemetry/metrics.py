"""Prometheus metrics of the sidecar: Istio's standard request metrics and `meshca_sidecar_*`.

Requests are counted into plain dictionaries keyed by their label values as each exchange
ends (`write`, a few microseconds, no lock: everything runs on the event loop); the
samples are built only when Prometheus scrapes (`collect`, a prometheus-client custom
collector). Labels follow Istio's, so its Grafana dashboards and Kiali work unchanged:

- `reporter`: `source` on the outbound side, `destination` on the inbound side;
- `source_principal` / `destination_principal`: SPIFFE IDs (the peer's as verified, the
  pod's own, or outbound the identity the service must present); `unknown` when none;
- `*_workload` and `*_workload_namespace`: from a SPIFFE ID `spiffe://TD/ns/NS/sa/SA`,
  the service account SA and the namespace NS; the pod's own come from `metrics.workload`
  / `metrics.namespace`, else $SIDECAR_WORKLOAD / $POD_NAMESPACE, else its SPIFFE ID;
- `destination_service`: outbound, the service called as `NAME.NS.svc.cluster.local`;
  inbound, the pod's own workload in that form;
- `request_protocol` `http` or `grpc` (`tcp` on the TCP metrics), `response_code`
  (for gRPC the HTTP status, 200 even for a call that failed), `grpc_response_status`
  (gRPC's status from the answer's trailers, or the one the sidecar gave; empty for HTTP),
  `response_flags` (Envoy's: `UO` overflow,
  `UF` connect failure, `UH` no healthy endpoint, `UT` timeout, `UC` upstream reset,
  `NR` no route, `FI` / `DI` injected abort / delay, `DC` the client hung up, `-` none) and
  `connection_security_policy` `mutual_tls`.

Opaque TCP connections are counted as Istio counts them:
`istio_tcp_connections_opened_total` (when bytes start to flow),
`istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total` and
`istio_tcp_received_bytes_total` (as the reporter sees them, added when the
connection closes), with the same labels but `response_code`. Refused TCP
connections are counted as closed with their flags, never as opened.

No path, query or header value is ever a label: the label values come from verified
identities, the configuration and status codes, so their number stays bounded.
`istio_request_bytes` and `istio_response_bytes` count body bytes.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from sidecar.localhttp import Request, Response, Routes
from sidecar.telemetry.record import ExchangeRecord

# Istio's buckets (milliseconds) for istio_request_duration_milliseconds.
DURATION_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)  # fmt: skip
SIZE_BYTES = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)

FLAGS = {
    "overloaded": "UO",
    "service_unavailable": "UF",
    "app_unavailable": "UF",
    "upstream_unavailable": "UF",
    "upstream_timeout": "UT",
    "upstream_reset": "UC",
    "bad_upstream_response": "UC",
    "unknown_service": "NR",
    "fault_abort": "FI",
    "client_disconnected": "DC",
}

REQUEST_LABELS = (
    "reporter",
    "source_principal",
    "destination_principal",
    "source_workload",
    "source_workload_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "request_protocol",
    "response_code",
    "response_flags",
    "grpc_response_status",
    "connection_security_policy",
)


def workload_of(spiffe_id: str | None) -> tuple[str, str]:
    """(workload, namespace) from `spiffe://TD/ns/NS/sa/SA`; `unknown` for anything else."""
    if spiffe_id:
        parts = spiffe_id.split("/")
        # ["spiffe:", "", TD, "ns", NS, "sa", SA]
        if len(parts) == 7 and parts[3] == "ns" and parts[5] == "sa":
            return parts[6], parts[4]
    return "unknown", "unknown"


def service_fqdn(name: str | None) -> str:
    """`backend.default` -> `backend.default.svc.cluster.local`."""
    if not name:
        return "unknown"
    return f"{name}.svc.cluster.local" if name.count(".") == 1 else name


class _Series:
    """Counts of one label set."""

    __slots__ = ("count", "ms_sum", "ms", "in_sum", "in_", "out_sum", "out")

    def __init__(self) -> None:
        self.count = 0
        self.ms_sum = 0.0
        self.ms = [0] * (len(DURATION_MS) + 1)
        self.in_sum = 0
        self.in_ = [0] * (len(SIZE_BYTES) + 1)
        self.out_sum = 0
        self.out = [0] * (len(SIZE_BYTES) + 1)


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(bounds, counts, strict=False):
        running += n
        out.append((repr(float(bound)), running))
    out.append(("+Inf", running + counts[-1]))
    return out


@dataclass
class Sources:
    """Where the scrape-time gauges come from (each may be absent)."""

    not_after: Callable[[], float | None] = lambda: None  # the certificate's, epoch seconds
    renewals: Callable[[], tuple[int, int]] = lambda: (0, 0)  # (ok, failed)
    bundle_sequence: Callable[[], int | None] = lambda: None
    last_poll: Callable[[], float | None] = lambda: None  # epoch seconds
    pools: Callable[[], dict[str, Any]] = dict  # name -> UpstreamPool
    spans: Callable[[], tuple[int, int] | None] = lambda: None  # (exported, dropped)


class SidecarMetrics:
    """The request counters (filled per exchange) and a collector over them and the rest."""

    def __init__(
        self,
        own_id: Callable[[], str | None],
        workload: str | None = None,
        namespace: str | None = None,
        sources: Sources | None = None,
    ) -> None:
        self.own_id = own_id
        self.workload = workload or os.environ.get("SIDECAR_WORKLOAD") or None
        self.namespace = namespace or os.environ.get("POD_NAMESPACE") or None
        self.sources = sources or Sources()
        self.series: dict[tuple[str, ...], _Series] = {}
        # TCP, by the labels of a request but its code: [opened, closed, sent, received]
        self.tcp: dict[tuple[str, ...], list[int]] = {}
        self.jwt: dict[str, int] = {}
        self.authz: dict[tuple[str, str], int] = {}
        self.retries: dict[str, int] = {}
        self.handshake_failures: dict[tuple[str, str], int] = {}
        self._own: str | None = None

    # -- the request path ----------------------------------------------------------

    def _key(self, rec: ExchangeRecord) -> tuple[str, ...]:
        own = self._own
        if own is None:
            own = self._own = self.own_id()
        protocol = "grpc" if rec.protocol == "grpc" else rec.protocol or "http"
        if rec.protocol == "HTTP/2" or rec.protocol == "websocket":
            protocol = "http"
        if rec.direction == "inbound":
            return (
                "destination",
                rec.peer or "unknown",
                own or "unknown",
                "",  # the pod's own service, filled in at scrape time
                str(rec.status),
                FLAGS.get(rec.error, "-") if rec.error else "-",
                protocol,
                "" if rec.grpc_status is None else str(rec.grpc_status),
            )
        flags = "-"
        if rec.error:
            flags = FLAGS.get(rec.error, "-")
        elif rec.fault == "delay":
            flags = "DI"
        return (
            "source",
            own or "unknown",
            rec.peer or "unknown",
            rec.service or "",
            str(rec.status),
            flags,
            protocol,
            "" if rec.grpc_status is None else str(rec.grpc_status),
        )

    def opened(self, rec: ExchangeRecord) -> None:
        """A TCP connection's bytes start to flow."""
        key = self._key(rec)
        key = key[:4] + ("-", "-", "tcp", "")
        t = self.tcp.get(key)
        if t is None:
            t = self.tcp[key] = [0, 0, 0, 0]
        t[0] += 1

    def write(self, rec: ExchangeRecord) -> None:
        """Count one finished exchange (or TCP connection)."""
        key = self._key(rec)
        if rec.protocol == "tcp":
            key = key[:4] + ("-", key[5], "tcp", "")
            t = self.tcp.get(key)
            if t is None:
                t = self.tcp[key] = [0, 0, 0, 0]
            t[1] += 1
            # sent: towards the peer (outbound: to the service; inbound: to the client)
            sent, received = (
                (rec.bytes_in, rec.bytes_out)
                if rec.direction == "outbound"
                else (rec.bytes_out, rec.bytes_in)
            )
            t[2] += sent
            t[3] += received
            return
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = _Series()
        s.count += 1
        ms = rec.ms
        s.ms_sum += ms
        s.ms[bisect.bisect_left(DURATION_MS, ms)] += 1
        s.in_sum += rec.bytes_in
        s.in_[bisect.bisect_left(SIZE_BYTES, rec.bytes_in)] += 1
        s.out_sum += rec.bytes_out
        s.out[bisect.bisect_left(SIZE_BYTES, rec.bytes_out)] += 1
        if rec.request_principal is not None:
            self.jwt["valid"] = self.jwt.get("valid", 0) + 1
        elif rec.error == "invalid_token":
            self.jwt["invalid"] = self.jwt.get("invalid", 0) + 1
        if rec.decision is not None:
            k = (rec.decision, rec.rule or "")
            self.authz[k] = self.authz.get(k, 0) + 1
            for rule in rec.dry_run:
                k = ("dry_run_deny", rule)
                self.authz[k] = self.authz.get(k, 0) + 1
            for rule in rec.audit:
                k = ("audit", rule)
                self.authz[k] = self.authz.get(k, 0) + 1
        if rec.retries:
            svc = rec.service or "unknown"
            self.retries[svc] = self.retries.get(svc, 0) + len(rec.retries)

    def refused(self, direction: str, reason: str) -> None:
        """A connection refused at its handshake (or just after it: the peer's certificate)."""
        k = (direction, reason)
        self.handshake_failures[k] = self.handshake_failures.get(k, 0) + 1

    # -- scrape time ---------------------------------------------------------------

    def _own_names(self) -> tuple[str, str]:
        workload, namespace = workload_of(self.own_id())
        return self.workload or workload, self.namespace or namespace

    def collect(self) -> Iterator[Metric]:
        """The samples, built now from the counters."""
        own_workload, own_ns = self._own_names()
        own_service = service_fqdn(f"{own_workload}.{own_ns}")
        requests = CounterMetricFamily(
            "istio_requests", "Requests, as Istio's standard metric", labels=REQUEST_LABELS
        )
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, as Istio's standard metric",
            labels=REQUEST_LABELS,
        )
        req_bytes = HistogramMetricFamily(
            "istio_request_bytes", "Request body sizes in bytes", labels=REQUEST_LABELS
        )
        resp_bytes = HistogramMetricFamily(
            "istio_response_bytes", "Response body sizes in bytes", labels=REQUEST_LABELS
        )
        for (reporter, src, dst, svc, code, flags, proto, grpc), s in list(self.series.items()):
            src_w, src_ns = workload_of(src)
            dst_w, dst_ns = workload_of(dst)
            if reporter == "destination":
                dst_w, dst_ns, service = own_workload, own_ns, own_service
            else:
                src_w, src_ns, service = own_workload, own_ns, service_fqdn(svc)
            labels = [
                reporter, src, dst, src_w, src_ns, dst_w, dst_ns, service,
                proto, code, flags, grpc, "mutual_tls",
            ]  # fmt: skip
            requests.add_metric(labels, s.count)
            duration.add_metric(labels, _buckets(DURATION_MS, s.ms), s.ms_sum)
            req_bytes.add_metric(labels, _buckets(SIZE_BYTES, s.in_), s.in_sum)
            resp_bytes.add_metric(labels, _buckets(SIZE_BYTES, s.out), s.out_sum)
        yield requests
        yield duration
        yield req_bytes
        yield resp_bytes
        yield from self._tcp_metrics(own_workload, own_ns, own_service)
        yield from self._sidecar_metrics()

    def _tcp_metrics(self, own_workload: str, own_ns: str, own_service: str) -> Iterator[Metric]:
        labels = [n for n in REQUEST_LABELS if n not in ("response_code", "grpc_response_status")]
        names = (
            ("istio_tcp_connections_opened", "TCP connections opened"),
            ("istio_tcp_connections_closed", "TCP connections closed"),
            ("istio_tcp_sent_bytes", "Bytes sent during TCP connections"),
            ("istio_tcp_received_bytes", "Bytes received during TCP connections"),
        )
        families = [CounterMetricFamily(n, h, labels=labels) for n, h in names]
        for (reporter, src, dst, svc, _code, flags, proto, _g), counts in list(self.tcp.items()):
            src_w, src_ns = workload_of(src)
            dst_w, dst_ns = workload_of(dst)
            if reporter == "destination":
                dst_w, dst_ns, service = own_workload, own_ns, own_service
            else:
                src_w, src_ns, service = own_workload, own_ns, service_fqdn(svc)
            values = [reporter, src, dst, src_w, src_ns, dst_w, dst_ns, service, proto, flags]
            for fam, n in zip(families, counts, strict=True):
                fam.add_metric([*values, "mutual_tls"], n)
        yield from families

    def _sidecar_metrics(self) -> Iterator[Metric]:
        src = self.sources
        not_after = src.not_after()
        g = GaugeMetricFamily(
            "meshca_sidecar_certificate_not_after_seconds",
            "When the pod's current certificate expires (seconds since the epoch)",
        )
        if not_after is not None:
            g.add_metric([], not_after)
        yield g
        ok, failed = src.renewals()
        c = CounterMetricFamily(
            "meshca_sidecar_renewals", "Enrollments and renewals by result", labels=["result"]
        )
        c.add_metric(["ok"], ok)
        c.add_metric(["error"], failed)
        yield c
        c = CounterMetricFamily(
            "meshca_sidecar_tls_handshake_failures",
            "Connections refused at or right after the TLS handshake, by reason",
            labels=["direction", "reason"],
        )
        for (direction, reason), n in list(self.handshake_failures.items()):
            c.add_metric([direction, reason], n)
        yield c
        c = CounterMetricFamily(
            "meshca_sidecar_jwt_verifications", "Inbound JWT verifications", labels=["result"]
        )
        for result, n in list(self.jwt.items()):
            c.add_metric([result], n)
        yield c
        c = CounterMetricFamily(
            "meshca_sidecar_authz_decisions",
            "Inbound authorization decisions by action and rule (dry-run and audit included)",
            labels=["action", "rule"],
        )
        for (action, rule), n in list(self.authz.items()):
            c.add_metric([action, rule], n)
        yield c
        seq = src.bundle_sequence()
        g = GaugeMetricFamily("meshca_sidecar_bundle_sequence", "The trust bundle in force")
        if seq is not None:
            g.add_metric([], seq)
        yield g
        last = src.last_poll()
        g = GaugeMetricFamily(
            "meshca_sidecar_bundle_last_poll_seconds",
            "When the trust bundle was last fetched from the CA (seconds since the epoch)",
        )
        if last is not None:
            g.add_metric([], last)
        yield g
        pools = src.pools()
        retries = CounterMetricFamily(
            "meshca_sidecar_retries",
            "Requests sent again, by outbound service",
            labels=["service"],
        )
        ejections = CounterMetricFamily(
            "meshca_sidecar_outlier_ejections",
            "Endpoints ejected by outlier detection, by outbound service",
            labels=["service"],
        )
        overflows = CounterMetricFamily(
            "meshca_sidecar_circuit_breaker_overflows",
            "Requests refused by a circuit breaker (503 overloaded), by outbound service",
            labels=["service"],
        )
        ejected = GaugeMetricFamily(
            "meshca_sidecar_endpoints_ejected", "Endpoints ejected now", labels=["service"]
        )
        for name, pool in pools.items():
            now = pool.clock()
            retries.add_metric([name], self.retries.get(name, 0))
            ejections.add_metric([name], pool.ejected_total)
            overflows.add_metric([name], pool.overloaded)
            ejected.add_metric(
                [name], sum(1 for ep in pool.endpoints if pool.outlier.ejected(ep, now))
            )
        yield retries
        yield ejections
        yield overflows
        yield ejected
        spans = src.spans()
        if spans is not None:
            c = CounterMetricFamily(
                "meshca_sidecar_spans", "Spans for OTLP export, by result", labels=["result"]
            )
            c.add_metric(["exported"], spans[0])
            c.add_metric(["dropped"], spans[1])
            yield c


def scrape_routes(registry: Any) -> Routes:
    """The metrics listener: `/metrics` and `/stats/prometheus` (where Istio's Envoy serves
    them), in Prometheus text or OpenMetrics as the scraper's Accept header asks. Nothing
    else is served on it: it is meant to be reachable by the scraper, unlike the admin port."""
    from prometheus_client.exposition import choose_encoder

    async def scrape(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(200, encoder(registry), content_type)

    routes = Routes()
    routes.add("GET", "/metrics", scrape)
    routes.add("GET", "/stats/prometheus", scrape)
    return routes
