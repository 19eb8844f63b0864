"""The outbound listener: the app's plain-HTTP proxy that originates mTLS to other sidecars.

The app calls `http://<service>/...` through `HTTP_PROXY=http://127.0.0.1:15001`
(absolute-form target) or sends a `Host` header. The service must be
configured; its endpoints are dialled with the pod's certificate, the server's
chain is verified against the bundle, its certificate must be a leaf (not a
CA) and its SPIFFE ID the configured one, or the call fails with 502 and
nothing is sent. A service configured with
`jwt_audience` also gets a JWT-SVID from the CA for that audience in
`Authorization: Bearer` (unless the app sent its own Authorization).

Every forwarded request carries one `traceparent` (the app's trace continued
with a new span id, or a new trace sampled at `tracing.sampling`), the app's
`tracestate` when its `traceparent` was valid, and an `x-request-id` (the
app's, or a new UUID4): `telemetry/tracing` decides, the app's copies are
replaced, and the access log records the trace and request ids.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import socket
import ssl
import time
from typing import Any

import httptools

from meshca.client import CAError, EnrollmentClient
from meshca.svid import SvidError
from sidecar.config import OutboundConfig, Service, TracingConfig
from sidecar.engines.base import ConnGroup, Limits
from sidecar.engines.h2.lazy import H2Downstream, H2Upstream
from sidecar.engines.http1.downstream import DownstreamConn
from sidecar.engines.http1.exchange import Exchange
from sidecar.engines.http1.framing import (
    FRAMING_HEADERS,
    HOP_BY_HOP,
    error_response,
    header_value,
)
from sidecar.engines.http1.router import Caller, RouteLater, Router
from sidecar.engines.http1.upstream import UpstreamConn
from sidecar.errors import SidecarError
from sidecar.identity.creds import CredentialStore, ResumingClientContext
from sidecar.identity.peer import LOCAL_APP, Peer, verify_der
from sidecar.protocols import CLIENT_ALPN, HTTP, HTTP2, TCP
from sidecar.routing.dispatch import OutboundDispatch
from sidecar.routing.routes import FAULT_HEADER, decide
from sidecar.routing.tcp import TcpOutbound, TcpUpstream
from sidecar.telemetry.tracing import (
    TRACE_HEADERS,
    log_ids,
    next_hop,
    sampling_threshold,
)
from sidecar.upstream.pool import UpstreamPool
from sidecar.upstream.retry import RetryPolicy

log = logging.getLogger("sidecar.outbound")

# What the app is told when the server's certificate breaks an X.509-SVID rule.
_OUTBOUND_CODES = {"not_leaf": "peer_verification_failed", "revoked": "peer_revoked"}

_SUFFIXES = (".svc.cluster.local", ".svc")
NAME_CACHE = 1024  # authorities whose service name is kept (cleared whole when full)
_NOT_FORWARDED = frozenset({b"host", b"expect", FAULT_HEADER})
# Not copied from the app's request: hop-by-hop, framing, the sidecar's own.
_SKIP = HOP_BY_HOP | FRAMING_HEADERS | _NOT_FORWARDED
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_destination(transport: asyncio.BaseTransport) -> str | None:
    """Where a NAT-redirected connection was going (`IP:PORT`), or None if not redirected."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        local = sock.getsockname()
    except OSError:
        return None
    port = int.from_bytes(raw[2:4], "big")
    ip = socket.inet_ntoa(raw[4:8])
    if (ip, port) == tuple(local[:2]):
        return None
    return f"{ip}:{port}"


def service_name(authority: bytes) -> str:
    """`backend.default:80` or `backend.default.svc.cluster.local` -> `backend.default`."""
    host = authority.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host.split("]", 1)[0] + "]"
    elif ":" in host:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    for suffix in _SUFFIXES:
        if host.endswith(suffix):
            return host[: -len(suffix)]
    return host


ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def _connect_answer(ok: bool, err: SidecarError | None) -> bytes:
    """What a CONNECT client is told once the tunnel is up, or why it is not."""
    if ok or err is None:
        return ESTABLISHED
    return error_response(err, close=True)


class JwtSvids:
    """JWT-SVIDs from the CA, one per audience, cached and renewed at 80 % of their life."""

    def __init__(self, store: CredentialStore, client: EnrollmentClient) -> None:
        self.store = store
        self.client = client
        self._tokens: dict[str, tuple[bytes, float, float]] = {}  # aud -> (token, refresh, exp)
        self._inflight: dict[str, asyncio.Task[None]] = {}

    def get(self, audience: str) -> bytes | None:
        """A valid token (a stale one starts a background renewal), or None."""
        hit = self._tokens.get(audience)
        if hit is None:
            return None
        token, refresh_at, exp = hit
        now = time.time()
        if now >= exp - 5:
            return None
        if now >= refresh_at and audience not in self._inflight:
            self._start(audience)
        return token

    def _start(self, audience: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._fetch(audience))
        self._inflight[audience] = task
        task.add_done_callback(lambda _t: self._inflight.pop(audience, None))
        return task

    async def fetch(self, audience: str) -> None:
        """Get a token now (joining a fetch already under way)."""
        task = self._inflight.get(audience) or self._start(audience)
        await asyncio.shield(task)

    async def _fetch(self, audience: str) -> None:
        creds = self.store.current
        if creds is None:
            return
        try:
            token, expires_at = await self.client.fetch_jwt(
                audience, creds.chain_pem, creds.key_pem
            )
        except CAError as e:
            log.warning("cannot get a JWT-SVID for audience %r: %s", audience, e)
            return
        now = time.time()
        exp = expires_at.timestamp()
        self._tokens[audience] = (token.encode("ascii"), now + (exp - now) * 0.8, exp)


class OutboundRouter(Router):
    """Maps a service name to its pool of mTLS connections."""

    direction = "outbound"

    def __init__(
        self,
        cfg: OutboundConfig,
        store: CredentialStore,
        jwts: JwtSvids | None = None,
        tracing: TracingConfig | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.jwts = jwts
        self.sample_below = sampling_threshold((tracing or TracingConfig()).sampling)
        self.pools: dict[str, UpstreamPool] = {}
        store.on_revoked(self._close_revoked)
        self.by_address = {a: name for name, svc in cfg.services.items() for a in svc.addresses}
        self.tcp_addresses = any(
            svc.protocol == TCP and svc.addresses for svc in cfg.services.values()
        )
        self.rng = random.Random()  # noqa: S311 (traffic splits, not secrets)
        # Per request, looked up rather than worked out: the service an authority names
        # (bounded), and each service's identity as the access log writes it.
        self._names: dict[bytes, str] = {}
        self._identity = {name: str(svc.identity) for name, svc in cfg.services.items()}
        for name, svc in cfg.services.items():
            t = svc.traffic
            self.pools[name] = UpstreamPool(
                name,
                t.endpoints,
                self._connector(svc),
                cfg.connect_timeout,
                unavailable="service_unavailable",
                retry=RetryPolicy(t.retries),
                lb=t.lb,
                breaker=t.circuit_breaker,
                outlier=t.outlier_detection,
                subsets=t.subsets,
                timeout=t.timeout,
                per_try_timeout=t.retries.per_try_timeout,
                multiplexed=svc.protocol == HTTP2,
            )

    def _connector(self, svc: Service):  # noqa: ANN202 (a closure for UpstreamPool)
        proto = svc.protocol
        make: Any = {HTTP: UpstreamConn, HTTP2: H2Upstream, TCP: TcpUpstream}[proto]
        # HTTP/1.1 needs no agreement (a sidecar that predates the meshca-* names, any
        # mTLS server); a tcp app's sidecar refuses meshca-http/1.1 by name.
        accepted = CLIENT_ALPN[proto]

        async def connect(pool: UpstreamPool, host: str, port: int) -> Any:  # (any protocol)
            creds = self.store.current
            if creds is None:
                raise SidecarError("not_ready", "the sidecar has no certificate yet")
            loop = asyncio.get_running_loop()
            try:
                ctx = creds.client_contexts[proto]
                transport, conn = await loop.create_connection(
                    lambda: make(pool),
                    host,
                    port,
                    ssl=ctx,
                    server_hostname=svc.name,
                )
            except ssl.SSLCertVerificationError as e:
                raise SidecarError(
                    "peer_verification_failed",
                    f"{svc.name} at {host}:{port}: certificate does not verify "
                    f"({e.verify_message})",
                ) from None
            sslobj = transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True)
            # A resumed session verified no chain and no dates this time (see ResumingClient-
            # Context): the certificate it carries must still be valid now.
            now = dt.datetime.now(dt.UTC) if sslobj.session_reused else None
            try:
                conn.peer = verify_der(
                    der, svc.identity.trust_domain, self.store.revoked, svc.identity, now
                )
            except SvidError as e:
                transport.abort()
                log.warning("%s at %s:%d: %s", svc.name, host, port, e.detail)
                code = _OUTBOUND_CODES.get(e.code, "peer_identity_mismatch")
                raise SidecarError(code, f"{svc.name}: {e.detail}") from None
            except ValueError as e:
                transport.abort()
                raise SidecarError("peer_identity_mismatch", f"{svc.name}: {e}") from None
            if isinstance(ctx, ResumingClientContext) and isinstance(conn, UpstreamConn):
                conn.on_reusable = lambda: ctx.keep(svc.name, sslobj)
            chosen = sslobj.selected_alpn_protocol()
            if proto != HTTP and chosen != accepted[0]:
                # An HTTP/1.1-only peer (or an older sidecar) would misread what follows.
                transport.abort()
                raise SidecarError(
                    "upstream_protocol",
                    f"{svc.name} at {host}:{port} does not accept {proto} (ALPN {chosen})",
                )
            return conn

        return connect

    # -- connections that are not one request -----------------------------------

    def tcp_conn(
        self,
        name: str,
        limits: Limits,
        sink: Any,
        group: ConnGroup | None,
        on_connected: Any = None,
    ) -> TcpOutbound:
        """The app's connection to the `tcp` service `name`, piped over mTLS."""
        svc = self.cfg.services[name]
        return TcpOutbound(
            self.pools[name], str(svc.identity), limits.idle_timeout, sink, group, on_connected
        )

    def engines(self, limits: Limits, sink: Any, group: ConnGroup | None) -> OutboundDispatch:
        """A connection from the app: HTTP/1.1 or HTTP/2 (a redirected `tcp` service's
        connection is piped)."""

        def tcp_for(transport: asyncio.BaseTransport) -> asyncio.Protocol | None:
            original = original_destination(transport)
            name = self.by_address.get(original) if original is not None else None
            if name is None or self.cfg.services[name].protocol != TCP:
                return None
            return self.tcp_conn(name, limits, sink, group)

        return OutboundDispatch(
            lambda: DownstreamConn(self, limits, sink, group),
            lambda: H2Downstream(self, limits, sink, group),
            tcp_for if self.tcp_addresses else None,
            limits.header_timeout,
            group,  # type: ignore[arg-type]
        )

    def tunnel(self, conn: DownstreamConn, ex: Exchange) -> Any:
        """CONNECT host:port to a configured service: a `tcp` service's bytes are piped
        over mTLS (200 once an endpoint is connected); an HTTP service's tunnel carries
        HTTP/1.1 or HTTP/2 that is proxied like any other request (200 at once)."""
        name = service_name(ex.target)
        ex.record.service = name
        if name not in self.pools:
            raise SidecarError("unknown_service", f"no outbound service named {name!r}")
        limits, sink, group = conn.limits, conn.access_log, conn.group
        if self.cfg.services[name].protocol == TCP:
            return lambda: self.tcp_conn(name, limits, sink, group, _connect_answer)
        engines = self.engines(limits, sink, group)
        engines.greeting = ESTABLISHED
        engines.tcp_for = None
        return lambda: engines

    def describe(self) -> dict[str, Any]:
        """Each service's pool as `GET /endpoints` shows it."""
        return {name: pool.describe() for name, pool in self.pools.items()}

    def _close_revoked(self, revoked: frozenset[str]) -> None:
        for pool in self.pools.values():
            n = pool.abort_where(lambda c: c.peer.serial in revoked)
            if n:
                log.warning("closed %d connection(s) to %s: certificate revoked", n, pool.label)

    def accept(self, conn: Caller) -> Peer:
        """The app is the only client; note where it meant to go if it was redirected here."""
        if self.by_address and conn.transport is not None:
            original = original_destination(conn.transport)
            if original is not None:
                return Peer(None, original_dst=original)
        return LOCAL_APP

    def route(self, conn: Caller, ex: Exchange) -> tuple[UpstreamPool, bytes]:
        """Find the service from the absolute URL or the Host header."""
        try:
            return self._route(conn, ex)
        except SidecarError:
            if ex.record.trace_id is None:  # refused before the head was built: log the ids too
                ex.record.trace_id, ex.record.request_id = log_ids(ex.headers, self.sample_below)
            raise

    def _route(self, conn: Caller, ex: Exchange) -> tuple[UpstreamPool, bytes]:
        target = ex.target
        authority = None
        original = conn.peer.original_dst
        if original is not None and target.startswith(b"/"):
            # Intercepted transparently: the destination the app dialled names the service.
            name = self.by_address.get(original)
            if name is None:
                raise SidecarError("unknown_service", f"no outbound service for {original}")
            return self._forward(ex, name, target, original.encode())
        if target[:7].lower() == b"http://":
            try:
                # (Any: the stub types path and query as bytes; either may be None)
                url: Any = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                raise SidecarError("bad_request_target", "request target is not a URL") from None
            authority = target[7:].split(b"/", 1)[0].split(b"?", 1)[0]
            path = url.path or b"/"
            target = path + (b"?" + url.query if url.query else b"")
        elif target[:8].lower() == b"https://":
            raise SidecarError(
                "use_plain_http", "call http://<service>/: the sidecar adds mutual TLS itself"
            )
        elif not target.startswith(b"/"):
            raise SidecarError("bad_request_target", "request target must be a URL or a path")
        if authority is None:
            authority = header_value(ex.headers, b"host")
        if not authority:
            raise SidecarError("no_host", "no service named: send a Host header or an absolute URL")
        name = self._names.get(authority)
        if name is None:
            name = service_name(authority)
            # only short authorities of services that exist: nothing else is worth its memory
            if name in self.pools and len(authority) <= 256:
                if len(self._names) >= NAME_CACHE:
                    self._names.clear()
                self._names[authority] = name
        if name not in self.pools:
            raise SidecarError("unknown_service", f"no outbound service named {name!r}")
        return self._forward(ex, name, target, authority)

    def _forward(
        self, ex: Exchange, name: str, target: bytes, authority: bytes
    ) -> tuple[UpstreamPool, bytes]:
        pool = self.pools[name]
        svc = self.cfg.services[name]
        rec = ex.record
        rec.service = name
        path = target.split(b"?", 1)[0]
        rec.path = path.decode("latin-1")
        rec.peer = self._identity[name]
        routes = svc.traffic.routes
        if routes:
            d = decide(routes, ex.method, path, ex.headers, self.rng)
            ex.subset = d.subset
            if d.abort is not None:
                rec.fault = "abort"
                raise SidecarError(
                    "fault_abort", f"fault injected by route {d.route!r}", status=d.abort
                )
            ex.delay = d.delay  # (a second pass, after a JWT-SVID fetch, decides afresh)
            rec.fault = "delay" if d.delay else None
        lines = [b"%s %s HTTP/1.1\r\n" % (ex.method, target), b"host: %s\r\n" % authority]
        drop = ex.drop
        trace_headers = []
        has_authorization = False
        for lk, v in ex.headers:  # one pass: strip, collect the trace headers, write
            if lk in _SKIP or lk in drop:
                continue
            if lk in TRACE_HEADERS:
                trace_headers.append((lk, v))
                continue
            if lk == b"authorization":
                has_authorization = True
            lines.append(b"%s: %s\r\n" % (lk, v))
        hop = next_hop(trace_headers, self.sample_below)
        lines.append(hop.stamp(rec))
        aud = svc.jwt_audience
        if aud is not None and self.jwts is not None:
            if not has_authorization:
                token = self.jwts.get(aud)
                if token is None:
                    if ex.rerouted:
                        raise SidecarError(
                            "no_jwt", f"cannot get a JWT-SVID for audience {aud!r} from the CA"
                        )
                    jwts = self.jwts
                    raise RouteLater(lambda: jwts.fetch(aud))
                lines.append(b"authorization: Bearer %s\r\n" % token)
        return pool, b"".join(lines)
