"""The sidecar's YAML configuration: parse every key, collect every problem, return a frozen value.

Unknown keys, missing required keys and bad values all stop start-up with one
ConfigError listing each problem by its dotted key (`inbound.app: ...`).
Relative paths are relative to the config file's folder. Every key is
documented in docs/sidecar.md.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshca import defaults, jwtcore
from meshca.config import Listen, parse_listen
from meshca.spiffe import InvalidSpiffeId, SpiffeId, validate_trust_domain
from sidecar import protocols, trafficconfig
from sidecar.trafficconfig import TrafficConfig


class ConfigError(ValueError):
    """The configuration is invalid; `problems` names each key that is wrong."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class CAConfig:
    """Where the CA is and how to authenticate to it the first time."""

    url: str  # the first of `urls`
    bundle: Path
    token_file: Path
    renew_fraction: float = 0.5
    retry_max: float = 60.0
    bundle_poll: float = 30.0
    urls: tuple[str, ...] = ()  # the CA's replicas, tried in turn (default: (url,))


# Envoy's `headers_with_underscores_action` values (HttpProtocolOptions).
UNDERSCORE_ACTIONS = ("ALLOW", "REJECT_REQUEST", "DROP_HEADER")
SEMICOLON_ACTIONS = ("ALLOW", "REJECT_REQUEST")


@dataclass(frozen=True)
class InboundConfig:
    """The mTLS listener in front of the app."""

    listen: Listen
    app: Listen
    # How the sidecar talks to the app: http (HTTP/1.1), http2 (h2c with prior knowledge,
    # gRPC) or tcp (opaque bytes after the peer's identity and the policy are checked).
    app_protocol: str = protocols.HTTP
    app_timeout: float = 30.0
    connect_timeout: float = 5.0
    header_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int | None = None
    # Request headers whose names contain `_`: CGI/WSGI apps read `X_Foo` and
    # `X-Foo` as the same variable, so by default they never reach the app.
    headers_with_underscores_action: str = "DROP_HEADER"
    # `;` (or `%3B`) in a path: Java routers strip `;params` (and treat `..;` as
    # `..`), so `/admin;x` would escape a policy rule for `/admin`.
    path_with_semicolons_action: str = "REJECT_REQUEST"
    # Open connections; past it new ones wait in the listen backlog until one closes.
    # About 42 KiB each when idle (docs/sidecar.md): 2048 fit the injected 256Mi limit.
    max_connections: int = 2048


@dataclass(frozen=True)
class Service:
    """An outbound destination: where it runs and who it must be."""

    name: str
    identity: SpiffeId
    traffic: TrafficConfig  # endpoints (or how to find them), balancing, retries, routes
    jwt_audience: str | None = None  # attach a JWT-SVID from the CA for this audience
    addresses: tuple[str, ...] = ()  # IP:PORT the app dials (transparent interception)
    protocol: str = protocols.HTTP  # what goes to the other sidecar: http, http2 or tcp
    listen: Listen | None = None  # tcp: a loopback port of its own the app dials

    @property
    def endpoints(self) -> tuple[Listen, ...]:
        """The statically listed endpoints' addresses."""
        return tuple(ep.address for ep in self.traffic.endpoints)


@dataclass(frozen=True)
class JwtIssuerConfig:
    """One trusted JWT issuer on the inbound path."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None
    jwks_file: Path | None
    jwks_ca: Path | None
    algorithms: tuple[str, ...]
    hmac_secret_file: Path | None
    leeway: float
    from_header: str
    prefix: str
    forward: bool
    claims_header: str | None
    jwks_refresh: float
    jwks_min_interval: float


@dataclass(frozen=True)
class JwtConfig:
    """JWT authentication (inbound)."""

    issuers: tuple[JwtIssuerConfig, ...]
    max_token_bytes: int = 8192


@dataclass(frozen=True)
class PolicyConfig:
    """Where the authorization policy comes from."""

    file: Path
    reload_interval: float = 2.0


@dataclass(frozen=True)
class OutboundConfig:
    """The plain-HTTP proxy the app calls."""

    listen: Listen
    services: Mapping[str, Service] = field(default_factory=dict)
    upstream_timeout: float = 30.0
    connect_timeout: float = 5.0
    max_connections: int = 1024


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (`/metrics`, `/stats/prometheus`) and this pod's names in it."""

    listen: Listen
    workload: str | None = None  # default: $SIDECAR_WORKLOAD, else the service account
    namespace: str | None = None  # default: $POD_NAMESPACE, else the SPIFFE ID's namespace


@dataclass(frozen=True)
class TracingConfig:
    """W3C trace context: how many new traces are sampled, and where spans go (optional)."""

    sampling: float = 0.01  # share of traces started here that are sampled (Istio's 1 %)
    otlp_endpoint: str | None = None  # OTLP/HTTP collector URL (…/v1/traces); None: no export
    otlp_batch: int = 512  # spans per export request
    otlp_interval: float = 2.0  # seconds between exports
    otlp_queue: int = 8192  # spans held for export; past it they are dropped (and counted)


ACCESS_LOG_MODES = ("all", "errors", "off")


@dataclass(frozen=True)
class AccessLogConfig:
    """Which finished exchanges get an access-log line (Envoy's access-log filters)."""

    mode: str = "all"  # all, errors (status >= 400 or an answer of the sidecar's own), off
    sample: float = 1.0  # mode all: share of the lines that are not errors written (errors: all)


@dataclass(frozen=True)
class SidecarConfig:
    """The whole configuration."""

    trust_domain: str
    ca: CAConfig
    inbound: InboundConfig | None
    outbound: OutboundConfig | None
    admin: Listen
    health: Listen
    source: Path
    jwt: JwtConfig | None = None
    policy: PolicyConfig | None = None
    drain_timeout: float = 20.0  # seconds in-flight requests get after SIGTERM
    metrics: MetricsConfig | None = None  # None: no metrics listener
    tracing: TracingConfig = TracingConfig()
    access_log: AccessLogConfig = AccessLogConfig()


class _Reader:
    """Walks the YAML document, recording problems instead of stopping at the first."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[str] = []

    def section(self, doc: Any, key: str, allowed: set[str], required: bool) -> dict | None:
        value = doc.get(key) if isinstance(doc, dict) else None
        if value is None:
            if required:
                self.problems.append(f"{key}: required")
            return None
        if not isinstance(value, dict):
            self.problems.append(f"{key}: must be a mapping")
            return None
        self.unknown(value, allowed, key + ".")
        return value

    def unknown(self, doc: dict, allowed: set[str], prefix: str = "") -> None:
        for k in doc:
            if k not in allowed:
                self.problems.append(f"{prefix}{k}: unknown key")

    def string(self, doc: dict, key: str, where: str, default: str | None = None) -> str | None:
        value = doc.get(key, default)
        if value is None:
            self.problems.append(f"{where}: required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.problems.append(f"{where}: must be a non-empty string")
            return None
        return value.strip()

    def path(self, doc: dict, key: str, where: str, must_exist: bool = True) -> Path | None:
        text = self.string(doc, key, where)
        if text is None:
            return None
        p = Path(text)
        p = p if p.is_absolute() else self.base / p
        if must_exist and not p.is_file():
            self.problems.append(f"{where}: no such file {str(p)!r}")
        return p

    def listen(self, doc: dict, key: str, where: str, default: str | None = None) -> Listen | None:
        text = self.string(doc, key, where, default)
        if text is None:
            return None
        try:
            return parse_listen(text)
        except ValueError as e:
            self.problems.append(f"{where}: {e}")
            return None

    def choice(
        self, doc: dict, key: str, where: str, default: str, allowed: tuple[str, ...]
    ) -> str:
        value = doc.get(key, default)
        if value not in allowed:
            self.problems.append(f"{where}: must be one of {', '.join(allowed)}")
            return default
        return value

    def number(
        self, doc: dict, key: str, where: str, default: float, lo: float, hi: float
    ) -> float:
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            self.problems.append(f"{where}: must be a number between {lo} and {hi}")
            return default
        return float(value)

    def whole(self, doc: dict, key: str, where: str, default: int, lo: int, hi: int) -> int:
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.problems.append(f"{where}: must be a whole number between {lo} and {hi}")
            return default
        return value


def _loopback(listen: Listen) -> bool:
    if listen.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen.host).is_loopback
    except ValueError:
        return False


def _protocol(r: _Reader, doc: dict, key: str, where: str) -> str:
    value = doc.get(key, protocols.HTTP)
    proto = protocols.ALIASES.get(value) if isinstance(value, str) else None
    if proto is None:
        r.problems.append(f"{where}: must be one of http, http2 (or grpc), tcp")
        return protocols.HTTP
    return proto


def parse_config(doc: Any, source: Path) -> SidecarConfig:
    """Validate a parsed YAML document; ConfigError listing every problem."""
    r = _Reader(source.parent)
    if not isinstance(doc, dict):
        raise ConfigError(["(top level): must be a mapping"])
    r.unknown(
        doc,
        {
            "trust_domain",
            "ca",
            "inbound",
            "outbound",
            "admin",
            "health",
            "jwt",
            "policy",
            "drain_timeout",
            "metrics",
            "tracing",
            "access_log",
        },
    )
    drain = r.number(doc, "drain_timeout", "drain_timeout", 20.0, 0, 3600)

    trust_domain = r.string(doc, "trust_domain", "trust_domain", "cluster.local") or ""
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as e:
        if trust_domain:
            r.problems.append(f"trust_domain: {e}")

    ca = None
    c = r.section(
        doc,
        "ca",
        {"url", "bundle", "token_file", "renew_fraction", "retry_max", "bundle_poll"},
        True,
    )
    if c is not None:
        raw_url = c.get("url")
        if isinstance(raw_url, list):
            urls = [u for u in raw_url if isinstance(u, str) and u]
            if not raw_url or len(urls) != len(raw_url):
                r.problems.append("ca.url: must be an https:// URL or a list of them")
                urls = []
        else:
            urls = [u] if (u := r.string(c, "url", "ca.url")) else []
        if any(not u.startswith("https://") for u in urls):
            r.problems.append("ca.url: must be an https:// URL (or a list of them)")
        url = urls[0] if urls else None
        bundle = r.path(c, "bundle", "ca.bundle")
        token = r.path(c, "token_file", "ca.token_file", must_exist=False)
        frac = r.number(c, "renew_fraction", "ca.renew_fraction", 0.5, 0.1, 0.9)
        retry_max = r.number(c, "retry_max", "ca.retry_max", 60.0, 1, 3600)
        poll = r.number(c, "bundle_poll", "ca.bundle_poll", 30.0, 0.2, 3600)
        if url and bundle and token:
            ca = CAConfig(url, bundle, token, frac, retry_max, poll, tuple(urls))

    inbound = None
    i = r.section(
        doc,
        "inbound",
        {
            "listen",
            "app",
            "app_protocol",
            "app_timeout",
            "connect_timeout",
            "header_timeout",
            "idle_timeout",
            "max_header_bytes",
            "max_body_bytes",
            "headers_with_underscores_action",
            "path_with_semicolons_action",
            "max_connections",
        },
        False,
    )
    if i is not None:
        listen = r.listen(i, "listen", "inbound.listen", f"0.0.0.0:{defaults.INBOUND_PORT}")
        app = r.listen(i, "app", "inbound.app")
        if app is not None and not _loopback(app):
            r.problems.append("inbound.app: the app must listen on loopback (127.0.0.1)")
        max_body = i.get("max_body_bytes")
        if max_body is not None and (
            isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0
        ):
            r.problems.append("inbound.max_body_bytes: must be a whole number of bytes or null")
            max_body = None
        hdr = r.number(i, "max_header_bytes", "inbound.max_header_bytes", 65536, 1024, 1 << 20)
        underscores = r.choice(
            i,
            "headers_with_underscores_action",
            "inbound.headers_with_underscores_action",
            "DROP_HEADER",
            UNDERSCORE_ACTIONS,
        )
        semicolons = r.choice(
            i,
            "path_with_semicolons_action",
            "inbound.path_with_semicolons_action",
            "REJECT_REQUEST",
            SEMICOLON_ACTIONS,
        )
        in_max = r.whole(i, "max_connections", "inbound.max_connections", 2048, 1, 1_000_000)
        app_protocol = _protocol(r, i, "app_protocol", "inbound.app_protocol")
        if listen and app:
            inbound = InboundConfig(
                listen=listen,
                app=app,
                app_protocol=app_protocol,
                app_timeout=r.number(i, "app_timeout", "inbound.app_timeout", 30, 0.1, 3600),
                connect_timeout=r.number(
                    i, "connect_timeout", "inbound.connect_timeout", 5, 0.1, 60
                ),
                header_timeout=r.number(
                    i, "header_timeout", "inbound.header_timeout", 10, 0.1, 300
                ),
                idle_timeout=r.number(i, "idle_timeout", "inbound.idle_timeout", 300, 1, 86400),
                max_header_bytes=int(hdr),
                max_body_bytes=max_body,
                headers_with_underscores_action=underscores,
                path_with_semicolons_action=semicolons,
                max_connections=in_max,
            )

    outbound = None
    o = r.section(
        doc,
        "outbound",
        {"listen", "services", "upstream_timeout", "connect_timeout", "max_connections"},
        False,
    )
    if o is not None:
        listen = r.listen(o, "listen", "outbound.listen", f"127.0.0.1:{defaults.OUTBOUND_PORT}")
        if listen is not None and not _loopback(listen):
            r.problems.append("outbound.listen: must be a loopback address (only the app calls it)")
        services: dict[str, Service] = {}
        raw = o.get("services", {})
        if not isinstance(raw, dict):
            r.problems.append("outbound.services: must be a mapping of service name to settings")
            raw = {}
        for name, svc in raw.items():
            where = f"outbound.services.{name}"
            if not isinstance(name, str) or not name or any(c in name for c in " /:"):
                r.problems.append(f"{where}: service name must be a host name")
                continue
            if not isinstance(svc, dict):
                r.problems.append(f"{where}: must be a mapping")
                continue
            r.unknown(
                svc,
                {"identity", "jwt_audience", "addresses", "protocol", "listen"}
                | trafficconfig.KEYS,
                where + ".",
            )
            proto = _protocol(r, svc, "protocol", f"{where}.protocol")
            svc_listen = None
            if "listen" in svc:
                svc_listen = r.listen(svc, "listen", f"{where}.listen")
                if proto != protocols.TCP:
                    r.problems.append(
                        f"{where}.listen: only a tcp service has a port of its own "
                        "(HTTP goes through outbound.listen)"
                    )
                elif svc_listen is not None and not _loopback(svc_listen):
                    r.problems.append(f"{where}.listen: must be a loopback address")
            if proto == protocols.TCP:
                for key in ("routes", "retries", "timeout", "jwt_audience"):
                    if key in svc:
                        r.problems.append(
                            f"{where}.{key}: does not apply to protocol tcp (no requests to see)"
                        )
            traffic, problems = trafficconfig.parse_traffic(svc, where)
            r.problems += problems
            if traffic.endpoints_file is not None:
                efile = Path(traffic.endpoints_file)
                efile = efile if efile.is_absolute() else r.base / efile
                traffic = dataclasses.replace(traffic, endpoints_file=str(efile))
            ident = None
            text = r.string(svc, "identity", f"{where}.identity")
            if text:
                try:
                    ident = SpiffeId.parse(text)
                except InvalidSpiffeId as e:
                    r.problems.append(f"{where}.identity: {e}")
            aud = None
            if "jwt_audience" in svc:
                aud = r.string(svc, "jwt_audience", f"{where}.jwt_audience")
            addrs: list[str] = []
            for n, a in enumerate(svc.get("addresses") or []):
                try:
                    addrs.append(str(parse_listen(str(a))))
                except ValueError as e:
                    r.problems.append(f"{where}.addresses[{n}]: {e}")
            if ident and not problems:
                services[name.lower()] = Service(
                    name.lower(), ident, traffic, aud, tuple(addrs), proto, svc_listen
                )
        out_max = r.whole(o, "max_connections", "outbound.max_connections", 1024, 1, 1_000_000)
        if listen:
            outbound = OutboundConfig(
                listen=listen,
                services=services,
                upstream_timeout=r.number(
                    o, "upstream_timeout", "outbound.upstream_timeout", 30, 0.1, 3600
                ),
                connect_timeout=r.number(
                    o, "connect_timeout", "outbound.connect_timeout", 5, 0.1, 60
                ),
                max_connections=out_max,
            )

    a = r.section(doc, "admin", {"listen"}, False) or {}
    admin = r.listen(a, "listen", "admin.listen", f"127.0.0.1:{defaults.ADMIN_PORT}")
    if admin is not None and not _loopback(admin):
        r.problems.append("admin.listen: must be a loopback address")
    h = r.section(doc, "health", {"listen"}, False) or {}
    health = r.listen(h, "listen", "health.listen", f"0.0.0.0:{defaults.HEALTH_PORT}")

    jwt_cfg = _parse_jwt(r, doc)
    policy = None
    pol = r.section(doc, "policy", {"file", "reload_interval"}, False)
    if pol is not None:
        pfile = r.path(pol, "file", "policy.file")
        interval = r.number(pol, "reload_interval", "policy.reload_interval", 2.0, 0.1, 3600)
        if pfile is not None:
            policy = PolicyConfig(pfile, interval)
    if (jwt_cfg or policy) and inbound is None:
        r.problems.append("jwt, policy: they apply to inbound requests; configure inbound too")
    if jwt_cfg and inbound is not None and inbound.app_protocol == protocols.TCP:
        r.problems.append(
            "jwt: inbound.app_protocol is tcp: its connections carry no requests to authenticate"
        )

    metrics = None
    m = r.section(doc, "metrics", {"listen", "workload", "namespace"}, False)
    if m is not None:
        mlisten = r.listen(m, "listen", "metrics.listen", f"0.0.0.0:{defaults.METRICS_PORT}")
        workload = r.string(m, "workload", "metrics.workload") if "workload" in m else None
        mns = r.string(m, "namespace", "metrics.namespace") if "namespace" in m else None
        if mlisten is not None:
            metrics = MetricsConfig(mlisten, workload, mns)
    tracing = TracingConfig()
    t = r.section(
        doc,
        "tracing",
        {"sampling", "otlp_endpoint", "otlp_batch", "otlp_interval", "otlp_queue"},
        False,
    )
    if t is not None:
        endpoint = None
        if t.get("otlp_endpoint") is not None:
            endpoint = r.string(t, "otlp_endpoint", "tracing.otlp_endpoint")
            if endpoint and not endpoint.startswith(("http://", "https://")):
                r.problems.append("tracing.otlp_endpoint: must be an http:// or https:// URL")
            elif endpoint and "@" in endpoint.split("/", 3)[2]:
                # it is logged when an export fails: no credentials in it
                r.problems.append("tracing.otlp_endpoint: must not contain user:password@")
        tracing = TracingConfig(
            sampling=r.number(t, "sampling", "tracing.sampling", 0.01, 0, 1),
            otlp_endpoint=endpoint,
            otlp_batch=r.whole(t, "otlp_batch", "tracing.otlp_batch", 512, 1, 100_000),
            otlp_interval=r.number(t, "otlp_interval", "tracing.otlp_interval", 2.0, 0.1, 600),
            otlp_queue=r.whole(t, "otlp_queue", "tracing.otlp_queue", 8192, 1, 1_000_000),
        )

    access_log = AccessLogConfig()
    a = r.section(doc, "access_log", {"mode", "sample"}, False)
    if a is not None:
        if isinstance(a.get("mode"), bool):  # YAML 1.1 reads a bare `off` as false, `on` as true
            a = {**a, "mode": "all" if a["mode"] else "off"}
        access_log = AccessLogConfig(
            mode=r.choice(a, "mode", "access_log.mode", "all", ACCESS_LOG_MODES),
            sample=r.number(a, "sample", "access_log.sample", 1.0, 0, 1),
        )

    if r.problems:
        raise ConfigError(r.problems)
    assert ca is not None and admin is not None and health is not None
    return SidecarConfig(
        trust_domain,
        ca,
        inbound,
        outbound,
        admin,
        health,
        source,
        jwt_cfg,
        policy,
        drain,
        metrics,
        tracing,
        access_log,
    )


_ISSUER_KEYS = {
    "issuer",
    "audiences",
    "jwks_uri",
    "jwks_file",
    "jwks_ca",
    "algorithms",
    "hmac_secret_file",
    "leeway",
    "from_header",
    "prefix",
    "forward",
    "claims_header",
    "jwks_refresh",
    "jwks_min_interval",
}
_KNOWN_ALGS = jwtcore.KNOWN


# A header the sidecar reads or writes for the app is spelled with '-': apps that
# read headers through CGI/WSGI names cannot tell `x_a` from `x-a`.
_NO_UNDERSCORE = "must not contain '_' (CGI/WSGI apps read '_' and '-' as the same name)"


def _parse_jwt(r: _Reader, doc: dict) -> JwtConfig | None:
    j = r.section(doc, "jwt", {"issuers", "max_token_bytes"}, False)
    if j is None:
        return None
    max_bytes = int(r.number(j, "max_token_bytes", "jwt.max_token_bytes", 8192, 256, 65536))
    raw = j.get("issuers")
    if not isinstance(raw, list) or not raw:
        r.problems.append("jwt.issuers: must be a non-empty list")
        return None
    issuers: list[JwtIssuerConfig] = []
    for i, item in enumerate(raw):
        w = f"jwt.issuers[{i}]"
        if not isinstance(item, dict):
            r.problems.append(f"{w}: must be a mapping")
            continue
        r.unknown(item, _ISSUER_KEYS, w + ".")
        iss = r.string(item, "issuer", f"{w}.issuer")
        auds = item.get("audiences", [])
        if not isinstance(auds, list) or not all(isinstance(a, str) and a for a in auds):
            r.problems.append(f"{w}.audiences: must be a list of strings")
            auds = []
        uri = item.get("jwks_uri")
        jfile = r.path(item, "jwks_file", f"{w}.jwks_file") if "jwks_file" in item else None
        if uri is not None and (not isinstance(uri, str) or not uri.startswith("https://")):
            r.problems.append(f"{w}.jwks_uri: must be an https:// URL")
        algs = item.get("algorithms", ["ES256", "RS256", "EdDSA"])
        if not isinstance(algs, list) or not algs or not all(isinstance(a, str) for a in algs):
            r.problems.append(f"{w}.algorithms: must be a non-empty list")
            algs = []
        for a in algs:
            if a.lower() == "none":
                r.problems.append(f"{w}.algorithms: 'none' is never accepted")
            elif a not in _KNOWN_ALGS:
                r.problems.append(f"{w}.algorithms: unknown algorithm {a!r}")
        hmac = [a for a in algs if a.startswith("HS")]
        secret = (
            r.path(item, "hmac_secret_file", f"{w}.hmac_secret_file")
            if "hmac_secret_file" in item
            else None
        )
        if hmac and secret is None:
            r.problems.append(f"{w}.hmac_secret_file: required for {', '.join(hmac)}")
        if secret is not None and not hmac:
            r.problems.append(f"{w}.hmac_secret_file: given, but no HS* algorithm is configured")
        asym = [a for a in algs if not a.startswith("HS")]
        if asym and uri is None and jfile is None:
            r.problems.append(f"{w}: jwks_uri or jwks_file is required for {', '.join(asym)}")
        if uri is not None and "jwks_file" in item:
            r.problems.append(f"{w}: give jwks_uri or jwks_file, not both")
        jca = r.path(item, "jwks_ca", f"{w}.jwks_ca") if "jwks_ca" in item else None
        header = r.string(item, "from_header", f"{w}.from_header", "Authorization") or ""
        if "_" in header:
            r.problems.append(f"{w}.from_header: {_NO_UNDERSCORE}")
        default_prefix = "Bearer " if header.lower() == "authorization" else ""
        prefix = item.get("prefix", default_prefix)
        if not isinstance(prefix, str):
            r.problems.append(f"{w}.prefix: must be a string")
            prefix = default_prefix
        forward = item.get("forward", True)
        if not isinstance(forward, bool):
            r.problems.append(f"{w}.forward: must be true or false")
        claims_header = item.get("claims_header")
        if claims_header is not None and (
            not isinstance(claims_header, str) or not claims_header or " " in claims_header
        ):
            r.problems.append(f"{w}.claims_header: must be a header name")
        elif claims_header is not None and "_" in claims_header:
            r.problems.append(f"{w}.claims_header: {_NO_UNDERSCORE}")
        leeway = r.number(item, "leeway", f"{w}.leeway", 60, 0, 3600)
        refresh = r.number(item, "jwks_refresh", f"{w}.jwks_refresh", 300, 1, 86400)
        min_int = r.number(item, "jwks_min_interval", f"{w}.jwks_min_interval", 10, 0, 3600)
        if iss:
            issuers.append(
                JwtIssuerConfig(
                    issuer=iss,
                    audiences=tuple(auds),
                    jwks_uri=uri if isinstance(uri, str) else None,
                    jwks_file=jfile,
                    jwks_ca=jca,
                    algorithms=tuple(algs),
                    hmac_secret_file=secret,
                    leeway=leeway,
                    from_header=header,
                    prefix=prefix,
                    forward=bool(forward),
                    claims_header=claims_header if isinstance(claims_header, str) else None,
                    jwks_refresh=refresh,
                    jwks_min_interval=min_int,
                )
            )
    names = [x.issuer for x in issuers]
    if len(set(names)) != len(names):
        r.problems.append("jwt.issuers: each issuer may appear once")
    return JwtConfig(tuple(issuers), max_bytes)


def load_config(path: Path, text: str | None = None) -> SidecarConfig:
    """Read and validate a YAML file (or `text`, with paths relative to `path`'s folder);
    ConfigError naming every problem."""
    if text is None:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError([f"{path}: cannot read ({e.strerror})"]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    return parse_config(doc, path.resolve())
