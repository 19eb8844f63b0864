"""The record of one exchange: what the access log writes (and what metrics will count).

The router fills in what it decided (the path it checked, the peer, the
service, the policy verdict), the engine what happened (status, bytes, time,
the error code of an answer it gave itself). Only these fields exist, so no
query string, body, token or key can reach a log through a record.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, init=False)
class ExchangeRecord:
    """One request and its answer, as observed by a listener.

    A dataclass for its fields, repr and equality, with an `__init__` of its own: one is
    made per request, and the generated one is interpreted even in the compiled request
    path (mypyc compiles a written `__init__`; tests/sidecar/test_record_init.py checks
    that it sets every field to its declared default)."""

    direction: str  # "inbound" or "outbound"
    method: str = ""
    path: str | None = None  # normalized, without the query
    status: int = 0
    peer: str | None = None  # the peer's SPIFFE ID (outbound: the one expected)
    ms: float = 0.0
    bytes_in: int = 0  # request body bytes
    bytes_out: int = 0  # response body bytes
    service: str | None = None  # outbound: the service called
    decision: str | None = None  # inbound: "allow" or "deny"
    rule: str | None = None  # the policy rule that decided
    dry_run: tuple[str, ...] = ()  # dry-run rules that would have refused
    audit: tuple[str, ...] = ()  # audit rules that matched
    request_principal: str | None = None  # issuer/subject of a verified JWT
    error: str | None = None  # the code of an answer the sidecar gave itself
    upstream: str | None = None  # outbound: the endpoint that answered (or was tried last)
    retries: tuple[str, ...] = ()  # outbound: "ENDPOINT CAUSE" for each try given up on
    fault: str | None = None  # an injected fault: "delay" or "abort"
    trace_id: str | None = None  # W3C trace id (32 hex digits) of the request
    span_id: str | None = None  # this hop's span id (16 hex digits), as sent on
    parent_span_id: str | None = None  # the span id the request came with, if any
    sampled: bool = False  # the trace's sampled flag (spans are exported only then)
    request_id: str | None = None  # x-request-id (the client's, or one made here)
    protocol: str | None = None  # None: HTTP/1.1; "HTTP/2", "grpc", "websocket", "tcp"
    grpc_status: int | None = None  # a gRPC call the sidecar answered itself: the status it gave

    def __init__(
        self,
        direction: str,
        method: str = "",
        path: str | None = None,
        status: int = 0,
        peer: str | None = None,
        ms: float = 0.0,
        bytes_in: int = 0,
        bytes_out: int = 0,
        service: str | None = None,
        decision: str | None = None,
        rule: str | None = None,
        dry_run: tuple[str, ...] = (),
        audit: tuple[str, ...] = (),
        request_principal: str | None = None,
        error: str | None = None,
        upstream: str | None = None,
        retries: tuple[str, ...] = (),
        fault: str | None = None,
        trace_id: str | None = None,
        span_id: str | None = None,
        parent_span_id: str | None = None,
        sampled: bool = False,
        request_id: str | None = None,
        protocol: str | None = None,
        grpc_status: int | None = None,
    ) -> None:
        self.direction = direction
        self.method = method
        self.path = path
        self.status = status
        self.peer = peer
        self.ms = ms
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.service = service
        self.decision = decision
        self.rule = rule
        self.dry_run = dry_run
        self.audit = audit
        self.request_principal = request_principal
        self.error = error
        self.upstream = upstream
        self.retries = retries
        self.fault = fault
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.sampled = sampled
        self.request_id = request_id
        self.protocol = protocol
        self.grpc_status = grpc_status


def new_record(direction: str, peer: str | None) -> ExchangeRecord:
    """`ExchangeRecord(direction, peer=peer)`: the record of a request just parsed."""
    return ExchangeRecord(direction, peer=peer)
