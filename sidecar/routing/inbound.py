"""The inbound listener: mTLS termination, JWT authentication and policy in front of the app.

Only peers with a certificate that chains to the current bundle (checked in
the handshake), carries exactly one SPIFFE ID of our trust domain and is a
leaf, not a CA (checked right after it, before any byte is read) get through. Then, per request: the
path is normalized (policy and app see the same path), a JWT is verified if
present (401 if invalid), the policy decides (403 if refused), client-supplied
identity headers are removed, the sidecar's own `X-Forwarded-Client-Cert`
(Envoy's format) and any verified-claims header are added, and the request
goes to the app on loopback. A refused request never reaches the app.

The app gets one `traceparent` (the caller's trace continued with a new span
id, or a new trace sampled at `tracing.sampling`), the caller's `tracestate`
when its `traceparent` was valid, and an `x-request-id` (the caller's, or a new
UUID4); `telemetry/tracing` decides, and the access log records both ids, for a
refused request too.

Header names with `_` are handled as `inbound.headers_with_underscores_action`
says (Envoy's option: ALLOW, REJECT_REQUEST, DROP_HEADER; DROP_HEADER by
default), because CGI/WSGI servers give `X_Forwarded_Client_Cert` and
`X-Forwarded-Client-Cert` the same name. In every mode a header that, lowercased
with `_` read as `-`, names one the sidecar owns (identity headers it writes,
the token headers it verifies, the trace headers it rewrites, hop-by-hop and
framing headers) is dropped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from meshca.svid import SvidError
from sidecar.config import InboundConfig, TracingConfig
from sidecar.engines.h2.lazy import H2Upstream
from sidecar.engines.http1.exchange import Exchange
from sidecar.engines.http1.framing import FRAMING_HEADERS, HOP_BY_HOP
from sidecar.engines.http1.router import Caller, RouteLater, Router
from sidecar.engines.http1.upstream import UpstreamConn
from sidecar.errors import SidecarError
from sidecar.identity.creds import CredentialStore
from sidecar.identity.peer import Peer, verify_der
from sidecar.policy.authn import Authenticator, InvalidToken, NeedKeys, claims_header_value
from sidecar.policy.authz import Request
from sidecar.policy.holder import PolicyHolder
from sidecar.policy.pathnorm import PathError, normalize
from sidecar.protocols import HTTP2
from sidecar.routing.routes import FAULT_HEADER
from sidecar.telemetry.tracing import (
    TRACE_HEADERS,
    log_ids,
    next_hop,
    sampling_threshold,
)
from sidecar.upstream.pool import UpstreamPool

log = logging.getLogger("sidecar.inbound")

# What a refused client is told, by the X.509-SVID rule its certificate broke.
_INBOUND_CODES = {"revoked": "revoked", "foreign_trust_domain": "foreign_trust_domain"}

# Headers only the sidecar may set for the app; a client's copies are removed first.
# (and the fault-forcing header: a peer must not force this pod's outbound faults through
# an app that passes headers on)
SIDECAR_HEADERS = frozenset({b"x-forwarded-client-cert", b"x-forwarded-proto", FAULT_HEADER})
# Answered (100-continue) or ignored by the engine, never forwarded.
NOT_FORWARDED = frozenset({b"expect"})
ALLOW, REJECT_REQUEST, DROP_HEADER = "ALLOW", "REJECT_REQUEST", "DROP_HEADER"
PATH_CACHE = 1024  # normalized request targets kept (cleared whole when full)
PATH_CACHE_TARGET = 256  # longer targets are normalized every time, never kept
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
DECISION_KEY_MAX = 4096  # path + token characters past which a decision is not memoized


def owned_headers(authn: Authenticator | None) -> frozenset[bytes]:
    """Names (lowercase, `-` for `_`) whose `_` spellings never reach the app, in any mode."""
    names = set(SIDECAR_HEADERS | TRACE_HEADERS | HOP_BY_HOP | FRAMING_HEADERS)
    if authn is not None:
        names |= authn.strip  # claims headers the sidecar writes
        names |= {name for name, _prefix in authn.sources}  # token headers it verifies
    return frozenset(n.replace(b"_", b"-") for n in names)


def xfcc(own_id: str, peer: Peer) -> bytes:
    """`By=<own id>;Hash=<sha256 hex of the peer certificate DER>;URI=<peer id>`."""
    return f"By={own_id};Hash={peer.cert_sha256};URI={peer.spiffe_id}".encode()


class InboundRouter(Router):
    """Checks the peer's SPIFFE ID and forwards to the app on loopback."""

    direction = "inbound"

    def __init__(
        self,
        cfg: InboundConfig,
        store: CredentialStore,
        authn: Authenticator | None = None,
        policy: PolicyHolder | None = None,
        tracing: TracingConfig | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.authn = authn
        self.policy = policy or PolicyHolder(None)
        self.strip = SIDECAR_HEADERS | (authn.strip if authn else frozenset())
        # Removed from every request before it goes to the app.
        self.skip = HOP_BY_HOP | FRAMING_HEADERS | NOT_FORWARDED | self.strip
        self.owned = owned_headers(authn)
        self.underscores = cfg.headers_with_underscores_action
        self.reject_semicolons = cfg.path_with_semicolons_action == REJECT_REQUEST
        self.conns: set[Caller] = set()
        self.tls_sessions = {"full": 0, "resumed": 0}  # accepted handshakes, all time
        store.on_revoked(self._close_revoked)
        h2 = cfg.app_protocol == HTTP2
        self.pool = UpstreamPool(
            "app",
            [(cfg.app.host, cfg.app.port)],
            self._connect_h2 if h2 else self._connect,
            cfg.connect_timeout,
            unavailable="app_unavailable",
            multiplexed=h2,
        )
        self._default_host = f"{cfg.app.host}:{cfg.app.port}".encode()
        # Request targets seen lately, normalized (a service's paths are few; bounded).
        self._paths: dict[bytes, tuple[bytes, bytes, str]] = {}
        # `skip` plus a token header that is not forwarded, per header name (an issuer's).
        self._skip_token: dict[bytes, frozenset[bytes]] = {}
        # The XFCC line per peer certificate, for the credentials it was made with.
        self._xfcc_creds: object = None
        self._xfcc: dict[str, bytes] = {}
        self.sample_below = sampling_threshold((tracing or TracingConfig()).sampling)

    def _close_revoked(self, revoked: frozenset[str]) -> None:
        """Close open connections from peers whose certificate was just revoked."""
        for conn in [c for c in self.conns if c.peer.serial in revoked]:
            log.warning(
                "closing a connection from %s: certificate %s revoked",
                conn.peer.spiffe_id,
                conn.peer.serial,
            )
            if conn.transport is not None:
                conn.transport.abort()

    def release(self, conn: Caller) -> None:
        """Forget a closed connection."""
        self.conns.discard(conn)

    async def _connect(self, pool: UpstreamPool, host: str, port: int) -> UpstreamConn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: UpstreamConn(pool), host, port)
        return conn

    async def _connect_h2(self, pool: UpstreamPool, host: str, port: int) -> H2Upstream:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: H2Upstream(pool, b"http"), host, port)
        return conn

    def accept(self, conn: Caller) -> Peer:
        """Require a leaf with one SPIFFE ID in our trust domain (TLS verified the chain)."""
        assert conn.transport is not None
        sslobj = conn.transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            raise SidecarError("no_client_certificate", "a client certificate is required")
        # A resumed session verified no chain and no dates this time: the certificate it
        # carries must still be valid now (revocation is checked for every connection).
        if sslobj.session_reused:
            now: dt.datetime | None = dt.datetime.now(dt.UTC)
            self.tls_sessions["resumed"] += 1
        else:
            now = None
            self.tls_sessions["full"] += 1
        try:
            peer = verify_der(der, self.store.trust_domain, self.store.revoked, now=now)
        except SvidError as e:
            raise SidecarError(
                _INBOUND_CODES.get(e.code, "bad_peer_certificate"), e.detail
            ) from None
        except ValueError as e:
            raise SidecarError("bad_peer_certificate", str(e)) from None
        self.conns.add(conn)
        return peer

    def route(self, conn: Caller, ex: Exchange) -> tuple[UpstreamPool, bytes]:
        """Normalize, authenticate, authorize; then the request for the app."""
        try:
            return self._route(conn, ex)
        except SidecarError:
            if ex.record.trace_id is None:  # refused before the head was built: log the ids too
                ex.record.trace_id, ex.record.request_id = log_ids(ex.headers, self.sample_below)
            raise

    def _route(self, conn: Caller, ex: Exchange) -> tuple[UpstreamPool, bytes]:
        if ex.method == b"CONNECT":
            raise SidecarError("method_not_allowed", "CONNECT is not supported")
        target = ex.target
        seen = self._paths.get(target)
        if seen is not None:
            path, query, path_text = seen
        else:
            if target == b"*" and ex.method == b"OPTIONS":
                path, query = b"*", b""
            else:
                try:
                    path, query = normalize(target, self.reject_semicolons)
                except PathError as bad_path:  # (one name per type: compiled code types each)
                    raise SidecarError("bad_path", str(bad_path)) from None
            path_text = path.decode("latin-1")
            if len(target) <= PATH_CACHE_TARGET and target != b"*":
                # (a long target would pin its size here; "*" is only OPTIONS's)
                if len(self._paths) >= PATH_CACHE:
                    self._paths.clear()
                self._paths[target] = path, query, path_text
        rec = ex.record
        rec.path = path_text
        ident = None
        token = None
        if self.authn is not None:
            try:
                token = self.authn.find_token(ex.headers)
                ident = self.authn.verify(token) if token is not None else None
            except InvalidToken as bad_token:
                raise _unauthorized(str(bad_token)) from None
            except NeedKeys as need:
                if ex.rerouted:  # refreshed once already: the key is not there
                    raise _unauthorized("token signing key is not in the issuer's JWKS") from None
                raise RouteLater(need.source.refresh) from None
        peer = conn.peer.spiffe_id
        method = _METHODS.get(ex.method) or ex.method.decode("latin-1")

        # The decision depends only on these: memoize it, unless the key is long (a peer
        # sending ever new long paths or tokens would pin them all there).
        def facts() -> Request:
            return Request(
                peer,
                path_text,
                method,
                ident.principal_parts if ident else None,
                ident.claims if ident else None,
            )

        policy = self.policy.current
        memo = len(path_text) + (len(token) if token else 0) <= DECISION_KEY_MAX
        if ident is None:
            key: tuple = (peer, path_text, method, None)
        else:
            # a token fixes its claims; if no rule reads claims, tokens of one principal
            # decide alike. Only for a token in use (the authenticator cached it): tokens
            # seen once (a new token on each request, of ever new principals too) would
            # fill the memo with decisions never read again (4,096 of them, about 1 MiB).
            key = (peer, path_text, method, token if policy.reads_claims else ident.principal_parts)
            authn = self.authn
            memo = memo and token is not None and authn is not None and authn.is_cached(token)
        if memo:
            decision = policy.decide_cached(key, facts)
        else:
            decision = policy.decide(facts())
        rec.decision = "allow" if decision.allowed else "deny"
        if decision.rule:
            rec.rule = decision.rule
        rec.dry_run = decision.dry_run
        rec.audit = decision.audit
        if ident is not None:
            rec.request_principal = ident.request_principal
        if not decision.allowed:
            if token is None and decision.rule is None and self.authn is not None:
                # No DENY rule refused it, and a JWT would have let it through: the
                # caller lacks a token, not a permission (RFC 6750 3.1: no error code).
                needs = self.policy.current.allows_with_token(
                    Request(peer, path_text, method, None, None)
                )
                if needs is not None:
                    raise SidecarError(
                        "jwt_required",
                        "a JWT is required",  # (which rule would allow it is not said)
                        headers=[(b"www-authenticate", b"Bearer")],
                    )
            fields = {"rule": decision.rule} if decision.rule else {}
            raise SidecarError("forbidden", decision.reason, fields=fields)

        skip = self.skip
        if ident is not None and not ident.issuer.forward:
            skip = self._skip_token.get(ident.issuer.from_header) or skip
            if ident.issuer.from_header not in skip:
                skip = skip | {ident.issuer.from_header}
                self._skip_token[ident.issuer.from_header] = skip
        drop = ex.drop
        underscores = self.underscores
        lines = [b"%s %s%s HTTP/1.1\r\n" % (ex.method, path, query)]
        has_host = False
        trace_headers = []
        for lk, v in ex.headers:  # one pass: strip, collect trace headers, check "_", write
            if lk in skip or lk in drop:
                continue
            if lk in TRACE_HEADERS:
                trace_headers.append((lk, v))
                continue
            if lk.find(b"_") >= 0:  # not `in`: it tries b"_" as an int first and raises
                if underscores == REJECT_REQUEST:
                    raise SidecarError(
                        "underscore_in_header_name",
                        f"header names with '_' are refused: {lk.decode('latin-1')}",
                    )
                if underscores == DROP_HEADER or lk.replace(b"_", b"-") in self.owned:
                    continue
            elif lk == b"host":
                has_host = True
            lines.append(b"%s: %s\r\n" % (lk, v))
        if not has_host:
            lines.append(b"host: %s\r\n" % self._default_host)
        hop = next_hop(trace_headers, self.sample_below)
        lines.append(hop.stamp(rec))
        creds = self.store.current
        if creds is not self._xfcc_creds or len(self._xfcc) >= PATH_CACHE:
            self._xfcc_creds, self._xfcc = creds, {}
        peer_cert = conn.peer.cert_sha256
        line = self._xfcc.get(peer_cert)  # type: ignore[arg-type]
        if line is None:
            own = str(creds.spiffe_id) if creds is not None else ""
            line = b"x-forwarded-client-cert: %s\r\n" % xfcc(own, conn.peer)
            self._xfcc[peer_cert] = line  # type: ignore[index]
        lines.append(line)
        lines.append(b"x-forwarded-proto: https\r\n")
        if ident is not None and ident.issuer.claims_header:
            lines.append(
                b"%s: %s\r\n" % (ident.issuer.claims_header, claims_header_value(ident.claims))
            )
        return self.pool, b"".join(lines)


def _unauthorized(reason: str) -> SidecarError:
    """401 with RFC 6750's challenge; the reason never contains the token."""
    safe = reason.replace('"', "'").encode("ascii", "replace")
    challenge = b'Bearer error="invalid_token", error_description="%s"' % safe
    return SidecarError("invalid_token", reason, headers=[(b"www-authenticate", challenge)])
