"""Traffic settings of one outbound service: discovery, balancing, retries, timeouts, limits,
outlier detection, subsets and routes (the sidecar's form of Istio's DestinationRule and
VirtualService). Parsed from `outbound.services.NAME`; every problem is named by its
dotted key, as in `config`. docs/sidecar.md documents every key.

`parse_endpoints` also reads an endpoints file at run time (same shape as `endpoints`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshca.config import Listen, parse_listen

LB_POLICIES = ("least_request", "round_robin", "random")
RETRY_ON = ("connect-failure", "reset", "gateway-error", "5xx")  # or a status code 500-599
MAX_ENDPOINTS = 1024
MAX_ROUTES = 256


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint: its address, labels (for subsets) and weight."""

    address: Listen
    labels: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1


@dataclass(frozen=True)
class DnsDiscovery:
    """Every A/AAAA record of `name`, at `port`, re-resolved every `refresh` seconds (or
    sooner when the records' TTL says so)."""

    name: str
    port: int
    refresh: float = 5.0


@dataclass(frozen=True)
class RetryConfig:
    """`attempts` retries after the first try (0: none), each at most `per_try_timeout`
    seconds to the response head (None: `outbound.upstream_timeout`)."""

    attempts: int = 2
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset({"connect-failure", "reset"})
    statuses: frozenset[int] = frozenset()  # retry_on entries that are status codes
    budget_percent: float = 20.0  # retries in flight, as a share of requests in flight
    min_retries: int = 3  # retries always allowed in flight, whatever the budget


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """Past these, a request is answered 503 `overloaded` at once."""

    max_connections: int = 1024
    max_pending: int = 1024  # requests waiting for a connection
    max_requests: int = 1024  # requests in flight


@dataclass(frozen=True)
class OutlierConfig:
    """Eject an endpoint after `consecutive_errors` 5xx answers or failed connects in a row,
    for `base_ejection_time` times the number of its ejections; at most
    `max_ejection_percent` of the endpoints at once."""

    consecutive_errors: int = 5
    interval: float = 10.0  # how often ejections are reviewed
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 50.0
    enabled: bool = True


@dataclass(frozen=True)
class HeaderMatch:
    """A request header that must be present and match: exactly, by prefix or by regex."""

    name: bytes  # lowercase
    kind: str  # "exact", "prefix", "regex"
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, value: bytes) -> bool:
        """Whether a header value matches."""
        text = value.decode("latin-1")
        if self.kind == "exact":
            return text == self.value
        if self.kind == "prefix":
            return text.startswith(self.value)
        assert self.pattern is not None
        return self.pattern.fullmatch(text) is not None


@dataclass(frozen=True)
class RouteMatch:
    """What a request must have for a route to apply (all of it)."""

    headers: tuple[HeaderMatch, ...] = ()
    path_exact: str | None = None
    path_prefix: str | None = None
    methods: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Destination:
    """A share of a route's traffic: a subset (None: every endpoint) and its weight."""

    subset: str | None
    weight: int = 100


@dataclass(frozen=True)
class FaultConfig:
    """Injected faults: a delay and an abort, each for a percentage of requests."""

    delay_percent: float = 0.0
    delay_seconds: float = 0.0
    abort_percent: float = 0.0
    abort_status: int | None = None  # None: the route has no abort (only a delay)


@dataclass(frozen=True)
class RouteConfig:
    """One route: when it applies, where its traffic goes, what faults it gets."""

    name: str
    match: RouteMatch
    to: tuple[Destination, ...]
    fault: FaultConfig | None = None


@dataclass(frozen=True)
class TrafficConfig:
    """How the sidecar reaches one service."""

    endpoints: tuple[EndpointSpec, ...] = ()
    dns: DnsDiscovery | None = None
    endpoints_file: str | None = None  # resolved against the config folder by `config`
    lb: str = "least_request"
    timeout: float | None = None  # the whole request, all tries
    retries: RetryConfig = RetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    outlier_detection: OutlierConfig = OutlierConfig()
    subsets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()


KEYS = {
    "endpoints",
    "dns",
    "endpoints_file",
    "lb",
    "timeout",
    "retries",
    "circuit_breaker",
    "outlier_detection",
    "subsets",
    "routes",
}


def _num(
    problems: list[str], doc: dict, key: str, where: str, default: float, lo: float, hi: float
) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        problems.append(f"{where}.{key}: must be a number between {lo:g} and {hi:g}")
        return default
    return float(value)


def _whole(
    problems: list[str], doc: dict, key: str, where: str, default: int, lo: int, hi: int
) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        problems.append(f"{where}.{key}: must be a whole number between {lo} and {hi}")
        return default
    return value


def _mapping(problems: list[str], doc: Any, where: str, allowed: set[str]) -> dict | None:
    if not isinstance(doc, dict):
        problems.append(f"{where}: must be a mapping")
        return None
    for k in doc:
        if k not in allowed:
            problems.append(f"{where}.{k}: unknown key")
    return doc


def _labels(problems: list[str], doc: Any, where: str) -> dict[str, str]:
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str | int | float) and not isinstance(v, bool)
        for k, v in doc.items()
    ):
        problems.append(f"{where}: must be a mapping of label name to value")
        return {}
    return {k: str(v) for k, v in doc.items()}


def parse_endpoints(raw: Any, where: str) -> tuple[tuple[EndpointSpec, ...], list[str]]:
    """A list of `HOST:PORT` or `{address, labels, weight}`: the endpoints and every problem."""
    problems: list[str] = []
    if not isinstance(raw, list):
        return (), [
            f"{where}: must be a non-empty list of HOST:PORT or {{address, labels, weight}}"
        ]
    if len(raw) > MAX_ENDPOINTS:
        return (), [f"{where}: at most {MAX_ENDPOINTS} endpoints"]
    out: list[EndpointSpec] = []
    seen: set[Listen] = set()
    for n, item in enumerate(raw):
        at = f"{where}[{n}]"
        labels: dict[str, str] = {}
        weight = 1
        if isinstance(item, dict):
            doc = _mapping(problems, item, at, {"address", "labels", "weight"})
            if doc is None:
                continue
            text = doc.get("address")
            if "labels" in doc:
                labels = _labels(problems, doc["labels"], f"{at}.labels")
            weight = _whole(problems, doc, "weight", at, 1, 1, 1000)
        else:
            text = item
        if not isinstance(text, str):
            problems.append(f"{at}: needs an address HOST:PORT")
            continue
        try:
            address = parse_listen(text.strip())
        except ValueError as e:
            problems.append(f"{at}: {e}")
            continue
        if address.port == 0:
            problems.append(f"{at}: port 0 is not an endpoint")
            continue
        if address in seen:
            problems.append(f"{at}: {address} is listed twice")
            continue
        seen.add(address)
        out.append(EndpointSpec(address, labels, weight))
    return tuple(out), problems


def _retries(problems: list[str], doc: Any, where: str) -> RetryConfig:
    d = _mapping(
        problems, doc, where, {"attempts", "per_try_timeout", "retry_on", "budget_percent"}
    )
    if d is None:
        return RetryConfig()
    per_try = None
    if d.get("per_try_timeout") is not None:
        per_try = _num(problems, d, "per_try_timeout", where, 5, 0.01, 3600)
    on: set[str] = set()
    statuses: set[int] = set()
    raw_on = d.get("retry_on", ["connect-failure", "reset"])
    if not isinstance(raw_on, list):
        problems.append(f"{where}.retry_on: must be a list")
        raw_on = []
    for n, item in enumerate(raw_on):
        if isinstance(item, int) and not isinstance(item, bool) and 500 <= item <= 599:
            statuses.add(item)
        elif isinstance(item, str) and item.isdigit() and 500 <= int(item) <= 599:
            statuses.add(int(item))
        elif item in RETRY_ON:
            on.add(item)
        else:
            problems.append(
                f"{where}.retry_on[{n}]: must be one of {', '.join(RETRY_ON)} or a status 500-599"
            )
    return RetryConfig(
        attempts=_whole(problems, d, "attempts", where, 2, 0, 10),
        per_try_timeout=per_try,
        retry_on=frozenset(on),
        statuses=frozenset(statuses),
        budget_percent=_num(problems, d, "budget_percent", where, 20, 0, 100),
    )


def _breaker(problems: list[str], doc: Any, where: str) -> CircuitBreakerConfig:
    d = _mapping(problems, doc, where, {"max_connections", "max_pending", "max_requests"})
    if d is None:
        return CircuitBreakerConfig()
    return CircuitBreakerConfig(
        max_connections=_whole(problems, d, "max_connections", where, 1024, 1, 1_000_000),
        max_pending=_whole(problems, d, "max_pending", where, 1024, 0, 1_000_000),
        max_requests=_whole(problems, d, "max_requests", where, 1024, 1, 1_000_000),
    )


def _outlier(problems: list[str], doc: Any, where: str) -> OutlierConfig:
    if doc is False:
        return OutlierConfig(enabled=False)
    d = _mapping(
        problems,
        doc,
        where,
        {"consecutive_errors", "interval", "base_ejection_time", "max_ejection_percent"},
    )
    if d is None:
        return OutlierConfig()
    return OutlierConfig(
        consecutive_errors=_whole(problems, d, "consecutive_errors", where, 5, 1, 1000),
        interval=_num(problems, d, "interval", where, 10, 0.1, 3600),
        base_ejection_time=_num(problems, d, "base_ejection_time", where, 30, 0.1, 86400),
        max_ejection_percent=_num(problems, d, "max_ejection_percent", where, 50, 0, 100),
    )


def _fault(problems: list[str], doc: Any, where: str) -> FaultConfig | None:
    d = _mapping(problems, doc, where, {"delay", "abort"})
    if d is None:
        return None
    delay_pct = delay_s = abort_pct = 0.0
    status: int | None = None
    if "delay" in d:
        dd = _mapping(problems, d["delay"], f"{where}.delay", {"percent", "seconds"})
        if dd is not None:
            delay_pct = _num(problems, dd, "percent", f"{where}.delay", 100, 0, 100)
            if "seconds" not in dd:
                problems.append(f"{where}.delay.seconds: required")
            delay_s = _num(problems, dd, "seconds", f"{where}.delay", 0, 0, 3600)
    if "abort" in d:
        da = _mapping(problems, d["abort"], f"{where}.abort", {"percent", "status"})
        if da is not None:
            abort_pct = _num(problems, da, "percent", f"{where}.abort", 100, 0, 100)
            status = _whole(problems, da, "status", f"{where}.abort", 503, 200, 599)
    return FaultConfig(delay_pct, delay_s, abort_pct, status)


def _match(problems: list[str], doc: Any, where: str) -> RouteMatch:
    d = _mapping(problems, doc, where, {"headers", "path_exact", "path_prefix", "methods"})
    if d is None:
        return RouteMatch()
    headers: list[HeaderMatch] = []
    raw = d.get("headers", {})
    if not isinstance(raw, dict):
        problems.append(f"{where}.headers: must be a mapping of header name to value or match")
        raw = {}
    for name, spec in raw.items():
        at = f"{where}.headers.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            problems.append(f"{at}: not a header name")
            continue
        if isinstance(spec, str):
            kind, value = "exact", spec
        elif isinstance(spec, dict) and len(spec) == 1:
            kind, value = next(iter(spec.items()))
            if kind not in ("exact", "prefix", "regex") or not isinstance(value, str):
                problems.append(f"{at}: must be a string or one of {{exact, prefix, regex}}")
                continue
        else:
            problems.append(f"{at}: must be a string or one of {{exact, prefix, regex}}")
            continue
        pattern = None
        if kind == "regex":
            try:
                pattern = re.compile(value)
            except re.error as e:
                problems.append(f"{at}.regex: {e}")
                continue
        headers.append(HeaderMatch(name.lower().encode("ascii"), kind, value, pattern))
    exact = prefix = None
    for key in ("path_exact", "path_prefix"):
        if key in d:
            v = d[key]
            if not isinstance(v, str) or not re.fullmatch(r"/[!-~]*", v) or "?" in v:
                problems.append(
                    f"{where}.{key}: must be a path starting with / (printable ASCII, no query)"
                )
            elif key == "path_exact":
                exact = v
            else:
                prefix = v
    methods: set[str] = set()
    if "methods" in d:
        raw_m = d["methods"]
        if not isinstance(raw_m, list) or not all(
            isinstance(m, str) and m.isalpha() for m in raw_m
        ):
            problems.append(f"{where}.methods: must be a list of HTTP methods")
        else:
            methods = {m.upper() for m in raw_m}
    return RouteMatch(tuple(headers), exact, prefix, frozenset(methods))


def _destinations(
    problems: list[str], doc: Any, where: str, subsets: Mapping[str, Any]
) -> tuple[Destination, ...]:
    if not isinstance(doc, list) or not doc:
        problems.append(f"{where}: must be a non-empty list of {{subset, weight}}")
        return ()
    out: list[Destination] = []
    for n, item in enumerate(doc):
        at = f"{where}[{n}]"
        d = _mapping(problems, item, at, {"subset", "weight"})
        if d is None:
            continue
        subset = d.get("subset")
        if subset is not None and (not isinstance(subset, str) or subset not in subsets):
            problems.append(f"{at}.subset: no subset named {subset!r} in this service")
            continue
        weight = _whole(problems, d, "weight", at, 100 if len(doc) == 1 else 0, 0, 10000)
        if "weight" not in d and len(doc) > 1:
            problems.append(f"{at}.weight: required when a route splits traffic")
        out.append(Destination(subset, weight))
    if out and sum(x.weight for x in out) == 0:
        problems.append(f"{where}: the weights add up to 0")
    return tuple(out)


def parse_traffic(svc: dict, where: str) -> tuple[TrafficConfig, list[str]]:
    """The traffic settings of `outbound.services.NAME` (`svc`), and every problem."""
    problems: list[str] = []
    sources = [k for k in ("endpoints", "dns", "endpoints_file") if k in svc]
    if len(sources) != 1:
        problems.append(f"{where}: needs exactly one of endpoints, dns, endpoints_file")
    endpoints: tuple[EndpointSpec, ...] = ()
    if "endpoints" in svc:
        endpoints, found = parse_endpoints(svc["endpoints"], f"{where}.endpoints")
        problems += found
        if not endpoints and not found:
            problems.append(
                f"{where}.endpoints: must be a non-empty list of HOST:PORT or "
                "{address, labels, weight}"
            )
    dns = None
    if "dns" in svc:
        d = _mapping(problems, svc["dns"], f"{where}.dns", {"name", "port", "refresh"})
        if d is not None:
            name = d.get("name")
            if not isinstance(name, str) or not re.fullmatch(
                r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?",
                name,
            ):
                problems.append(f"{where}.dns.name: must be a DNS name")
                name = ""
            port = _whole(problems, d, "port", f"{where}.dns", 0, 1, 65535)
            if "port" not in d:
                problems.append(f"{where}.dns.port: required")
            refresh = _num(problems, d, "refresh", f"{where}.dns", 5, 0.1, 3600)
            dns = DnsDiscovery(name.rstrip("."), port, refresh)
    efile = None
    if "endpoints_file" in svc:
        v = svc["endpoints_file"]
        if not isinstance(v, str) or not v.strip():
            problems.append(f"{where}.endpoints_file: must be a file path")
        else:
            efile = v.strip()
    lb = svc.get("lb", "least_request")
    if lb not in LB_POLICIES:
        problems.append(f"{where}.lb: must be one of {', '.join(LB_POLICIES)}")
        lb = "least_request"
    timeout = None
    if svc.get("timeout") is not None:
        timeout = _num(problems, svc, "timeout", where, 15, 0.01, 3600)
    retries = _retries(problems, svc["retries"], f"{where}.retries") if "retries" in svc else None
    breaker = (
        _breaker(problems, svc["circuit_breaker"], f"{where}.circuit_breaker")
        if "circuit_breaker" in svc
        else None
    )
    outlier = (
        _outlier(problems, svc["outlier_detection"], f"{where}.outlier_detection")
        if "outlier_detection" in svc
        else None
    )
    subsets: dict[str, dict[str, str]] = {}
    raw_subsets = svc.get("subsets", {})
    if not isinstance(raw_subsets, dict):
        problems.append(f"{where}.subsets: must be a mapping of subset name to labels")
        raw_subsets = {}
    for name, labels in raw_subsets.items():
        if not isinstance(name, str) or not name:
            problems.append(f"{where}.subsets: subset names must be strings")
            continue
        subsets[name] = _labels(problems, labels, f"{where}.subsets.{name}")
    routes: list[RouteConfig] = []
    raw_routes = svc.get("routes", [])
    if not isinstance(raw_routes, list) or len(raw_routes) > MAX_ROUTES:
        problems.append(f"{where}.routes: must be a list of at most {MAX_ROUTES} routes")
        raw_routes = []
    for n, item in enumerate(raw_routes):
        at = f"{where}.routes[{n}]"
        d = _mapping(problems, item, at, {"name", "match", "to", "fault"})
        if d is None:
            continue
        rname = d.get("name", str(n))
        if not isinstance(rname, str | int):
            problems.append(f"{at}.name: must be a string")
            rname = str(n)
        match = _match(problems, d.get("match", {}), f"{at}.match")
        to = _destinations(problems, d.get("to", [{"subset": None}]), f"{at}.to", subsets)
        fault = _fault(problems, d["fault"], f"{at}.fault") if "fault" in d else None
        routes.append(RouteConfig(str(rname), match, to, fault))
    cfg = TrafficConfig(
        endpoints=endpoints,
        dns=dns,
        endpoints_file=efile,
        lb=lb,
        timeout=timeout,
        retries=retries or RetryConfig(),
        circuit_breaker=breaker or CircuitBreakerConfig(),
        outlier_detection=outlier or OutlierConfig(),
        subsets=subsets,
        routes=tuple(routes),
    )
    return cfg, problems
