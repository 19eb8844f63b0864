"""The CA's HTTPS API (the only HTTP code of meshca): enrollment, bundle, health.

One middleware turns every exception into the JSON error `{"error", "detail"}`
with its status and writes one JSON access-log line per request. The server's
own TLS certificate is issued from the CA's intermediate at start and renewed
in the background at half its lifetime; new handshakes pick it up at once.
With `--metrics-listen`, a second, plain-HTTP listener serves `GET /metrics`
(meshca/metrics.py); the outcomes it counts are counted here, where they are decided.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import json
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509
from prometheus_client.exposition import choose_encoder

from meshca import listener, metrics, pki, store, tlsutil
from meshca.authority import Authority, ensure_jwt_key
from meshca.config import Listen, ServeConfig
from meshca.enroll import NONE, Enroller, json_object
from meshca.errors import (
    BadRequest,
    Forbidden,
    MeshcaError,
    RateLimited,
    StateError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from meshca.jwks import FileJwks, JwksSource, UrlJwks
from meshca.jwtsvid import DEFAULT_TTL, JwtIssuer, check_audience
from meshca.ratelimit import RateLimiter
from meshca.spiffe import SpiffeId
from meshca.store import StateDir
from meshca.tokens import JoinTokens, K8sTokens, peek_issuer

log = logging.getLogger("meshca.server")
access_log = logging.getLogger("meshca.access")

SERVER_CERT_TTL = dt.timedelta(hours=24)
HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to a finished TLS handshake
DRAIN_LIMIT = 1 << 20  # read and drop up to this much of an oversized body, so the client sees 413

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    431: "headers_too_large",
}


def json_response(
    doc: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer with a trailing newline (friendly to curl)."""
    return web.Response(
        text=json.dumps(doc) + "\n", status=status, content_type="application/json", headers=headers
    )


def error_response(err: MeshcaError) -> web.Response:
    """The one place an exception becomes what the peer sees."""
    headers = {}
    if isinstance(err, RateLimited):
        headers["Retry-After"] = str(max(1, int(err.retry_after + 0.999)))
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="meshca"'
    return json_response(err.to_json(), err.status, headers)


AUTH_FAILURES = web.AppKey("auth_failures", RateLimiter)
METRICS = web.AppKey("metrics", metrics.CaMetrics)


def check_source(request: web.Request) -> None:
    """RateLimited if the caller's address has used up its failed authentications."""
    limiter, source = request.app.get(AUTH_FAILURES), request.remote
    if limiter is not None and source:
        wait = limiter.peek(source)
        if wait > 0:
            raise RateLimited(f"too many failed authentications from {source}", retry_after=wait)


@web.middleware
async def errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map exceptions to JSON errors; log one JSON line per request (never headers or bodies).

    Every 401 also costs the caller's source address a token of its failed-authentication
    budget (`check_source` refuses it once spent). Every error answered is counted in the
    metrics by its code (`meshca_ca_refusals_total`), a rate limit also on its own."""
    start = time.perf_counter()
    counts = request.app.get(METRICS)
    try:
        resp = await handler(request)
    except MeshcaError as err:
        resp = error_response(err)
        limiter = request.app.get(AUTH_FAILURES)
        if err.status == 401 and limiter is not None and request.remote:
            limiter.check(request.remote)
        if counts is not None:
            counts.refused(err.code)
            if isinstance(err, RateLimited):
                counts.rate_limited()
    except web.HTTPException as exc:
        code = _HTTP_CODES.get(exc.status, "http_error")
        resp = json_response({"error": code, "detail": exc.reason}, exc.status)
        if counts is not None and exc.status >= 400:
            counts.refused(code)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        resp = json_response({"error": "internal", "detail": "internal error"}, 500)
        if counts is not None:
            counts.refused("internal")
    access_log.info(
        json.dumps(
            {
                "ts": pki.rfc3339(dt.datetime.now(dt.UTC)),
                "method": request.method,
                "path": request.path,
                "status": resp.status,
                "ms": round((time.perf_counter() - start) * 1000, 2),
                "peer": request.remote,
                "id": request.get("spiffe_id"),
            }
        )
    )
    return resp


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The client's certificate, already verified against the bundle by the TLS layer."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def bearer_token(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer <token>`, None if absent; 401 if malformed."""
    value = request.headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("Authorization must be 'Bearer <token>'", code="invalid_token")
    return token


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The whole body, or TooLarge once it passes `limit` (Content-Length checked first)."""
    if request.content_length is not None and request.content_length > limit:
        await _drain(request)
        raise TooLarge(f"body of {request.content_length} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            await _drain(request)
            raise TooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: web.Request) -> None:
    drained = 0
    with contextlib.suppress(Exception):
        async for chunk in request.content.iter_any():
            drained += len(chunk)
            if drained > DRAIN_LIMIT:
                break


LEDGER_COUNT_TTL = 5.0  # seconds a count of the ledger's rows serves /metrics
READY_TTL = 1.0  # seconds one check of the store serves /readyz
_T = TypeVar("_T")


@dataclass(frozen=True)
class Active:
    """One generation of the running CA: the signing material and the TLS context serving
    a certificate from it. Replaced whole, by one assignment, on a reload or a renewal."""

    authority: Authority
    ssl_context: ssl.SSLContext = field(repr=False)
    serving_expires: dt.datetime


class CAServer:
    """The running CA: its current generation (`active`), ledger and enroller."""

    def __init__(
        self,
        config: ServeConfig,
        clock: store.Clock = store.utcnow,
        state_store: store.StateStore | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        # The state directory, or the shared PostgreSQL store of several replicas.
        self.state_store = state_store or store.open_store(
            config.home, config.store_dsn, config.kek_file, clock, config.migrate
        )
        # A store over the network is called on worker threads, never on the event loop.
        self.offload = self.state_store.kind != StateDir.kind
        authority = Authority.load(self.state_store)
        self.ledger = self.state_store.ledger(clock)
        token_key = self.state_store.key(store.TOKEN_KEY_FILE)
        join = JoinTokens(token_key, authority.trust_domain)
        self.jwks: JwksSource | None = None
        k8s = None
        if config.k8s_issuer:
            if config.k8s_jwks and not config.k8s_jwks.startswith("https://"):
                self.jwks = FileJwks(Path(config.k8s_jwks))
            else:  # a JWKS URL, or discovery from the issuer URL
                self.jwks = UrlJwks(
                    config.k8s_jwks or config.k8s_issuer,
                    config.k8s_ca_file,
                    config.k8s_token_file,
                    refresh=config.k8s_jwks_refresh,
                    min_interval=config.k8s_jwks_min_interval,
                    discover=config.k8s_jwks is None,
                )
            k8s = K8sTokens(
                config.k8s_issuer, config.k8s_audiences, self.jwks, authority.trust_domain
            )
        self.enroller = Enroller(
            lambda: self.active.authority,
            self.ledger,
            join,
            k8s,
            RateLimiter(config.rate, config.burst),
            config.cert_ttl,
            clock,
            offload=self.offload,
        )
        self.jwt_issuer = JwtIssuer(ensure_jwt_key(self.state_store), authority.trust_domain)
        self.jwt_limiter = RateLimiter(config.rate, config.burst)
        self.metrics = metrics.CaMetrics(lambda: self.active.authority)
        # A scrape counts ledger rows on a thread of its own, with a connection of its own
        # (a Ledger belongs to the thread that opened it), so the event loop never waits.
        self._metrics_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="meshca-metrics"
        )
        self._metrics_ledger: store.LedgerStore | None = None
        self._ledger_counted_at = float("-inf")  # loop time of the last ledger count
        self.active = self._activate(authority)
        self._state_revision = self.state_store.revision()
        self.reloads = 0
        self._last_reload_error: str | None = None
        self.started_at = store.iso(clock())
        self.url = ""  # the bound URL, once serving (for the replicas table)
        self._changed = asyncio.Event()  # set by the store's change listener
        self._loop: asyncio.AbstractEventLoop | None = None
        self._swapping = asyncio.Lock()  # one change of `active` at a time
        self._ready_at = float("-inf")  # loop time of the last store check of /readyz
        self._ready_error: str | None = None
        # The listening socket's context hands each handshake to the current one, so a
        # reload (new roots, new intermediate, new serving certificate) applies at once.
        self.listener_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.listener_context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The verify mode stays with the connection (OpenSSL copies it at creation); the
        # trusted roots come from the context swapped in.
        self.listener_context.verify_mode = ssl.CERT_OPTIONAL
        # A resumed session skips chain verification: a renewal on a session from before
        # a root was retired must not pass. The session state lives on this context.
        tlsutil.no_resumption(self.listener_context)
        self.listener_context.load_verify_locations(cadata=authority.bundle_pem())

        def pick(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            sslobj.context = self.active.ssl_context

        self.listener_context.sni_callback = pick
        tlsutil.load_chain(self.listener_context, *self._placeholder_chain())

    def _placeholder_chain(self) -> tuple[str, bytes]:
        # The listener context itself never completes a handshake (the SNI callback swaps
        # in the real one first), but OpenSSL wants it to hold a certificate.
        key = pki.new_key()
        cert = self.authority.issue(
            key.public_key(), self.server_id, self.clock(), dt.timedelta(minutes=10)
        )
        return self.authority.chain_pem(cert), pki.key_pem(key)

    async def blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` on a worker thread when the store is remote, else here."""
        return await self.enroller.call(fn, *args)

    async def swap(self, fn: Callable[[], _T]) -> _T:
        """Run a change of generation (a reload, a renewal of the serving certificate) alone:
        on a worker thread one could otherwise put back what the other replaced."""
        async with self._swapping:
            return await self.blocking(fn)

    def _renew_serving(self) -> None:
        self.active = self._activate(self.active.authority)

    def store_for_change(self) -> store.StateStore:
        """Where a rotation step is taken: a state directory of its own per step (files in
        use by one thread), or the shared store (its changes are serialized by its lock)."""
        return StateDir(self.config.home) if not self.offload else self.state_store

    @property
    def authority(self) -> Authority:
        """The current signing material (read it once per request: a reload swaps it)."""
        return self.active.authority

    def reload_if_changed(self) -> bool:
        """Adopt what `meshca rotate` changed in state.json; keep the old state if it is bad.

        Everything the new state needs (the Authority, a serving certificate from the
        new intermediate, a TLS context trusting the new roots) is built first; then
        one assignment publishes it to the enroller, the handlers and new handshakes.
        """
        try:
            revision = self.state_store.revision()
        except Exception as e:
            self._reload_failed(f"the store cannot be read: {type(e).__name__}: {e}")
            return False
        if revision == self._state_revision:
            return False
        # On failure the revision is not recorded: the next check tries again, since what
        # failed (a file's permissions, the ledger, a full disk) may be fixed without
        # the state changing. The same failure is logged once.
        try:
            authority = Authority.load(self.state_store)
            active = self._activate(authority)
        except StateError as e:
            self._reload_failed(f"the new one does not load: {e.detail}")
            return False
        except Exception as e:
            self._reload_failed(f"reloading it failed: {type(e).__name__}: {e}")
            return False
        self._state_revision = revision
        self._last_reload_error = None
        old_seq = self.active.authority.state.sequence
        self.active = active
        self.reloads += 1
        log.info(
            "CA state reloaded: bundle sequence %d -> %d, issuing under %s, stage %s",
            old_seq,
            authority.state.sequence,
            authority.state.issuing_root,
            authority.state.root_rotation["stage"],
        )
        return True

    def _reload_failed(self, why: str) -> None:
        if why != self._last_reload_error:
            log.error("keeping the current CA state; %s", why)
        self._last_reload_error = why

    async def watch_state_forever(self) -> None:
        """Reload when the state changes: on the store's notification, else by polling its
        revision every `reload_interval`; a shared store also records this replica's
        heartbeat. Never dies."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.config.reload_interval)
            self._changed.clear()
            try:
                await self.swap(self.reload_if_changed)
            except Exception:
                log.exception("reloading the CA state failed")
            if self.offload:
                await self._heartbeat()

    def state_changed(self) -> None:
        """Called (from any thread) when the store says the state changed."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._changed.set)

    async def _heartbeat(self) -> None:
        from meshca import __version__

        beat = getattr(self.state_store, "heartbeat", None)
        if beat is None:
            return
        try:
            await self.blocking(
                beat,
                self.replica_name,
                self.url,
                __version__,
                self.started_at,
                int(self._state_revision),  # type: ignore[call-overload]
            )
        except Exception as e:  # the database is down: the reload has said so
            log.debug("heartbeat not recorded: %s", type(e).__name__)

    @property
    def replica_name(self) -> str:
        """This replica's name in the store's replicas table."""
        return self.config.replica_name or f"{socket.gethostname()}:{self.config.listen.port}"

    @property
    def server_id(self) -> SpiffeId:
        """The CA's own identity in its serving certificate."""
        return SpiffeId.for_service_account(self.authority.trust_domain, "mesh-system", "meshca")

    def _activate(self, authority: Authority) -> Active:
        """A complete new generation: a fresh serving certificate from `authority`'s
        intermediate in a new TLS context that trusts `authority`'s roots (for renewals)."""
        key = pki.new_key()
        now = self.clock()
        server_id = SpiffeId.for_service_account(authority.trust_domain, "mesh-system", "meshca")
        cert = authority.issue(
            key.public_key(),
            server_id,
            now,
            SERVER_CERT_TTL,
            self.config.server_dns_names,
            self.config.server_ips,
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Optional client certificates: renewals present theirs, enrollments use a token.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        tlsutil.no_resumption(ctx)
        ctx.load_verify_locations(cadata=authority.bundle_pem())
        tlsutil.load_chain(ctx, authority.chain_pem(cert), pki.key_pem(key))
        self.ledger.record_issued(
            store.IssuedRecord(
                serial=pki.serial_hex(cert),
                spiffe_id=str(server_id),
                not_before=store.iso(cert.not_valid_before_utc),
                not_after=store.iso(cert.not_valid_after_utc),
                issued_at=store.iso(now),
                credential="ca_server",
                issuer=pki.serial_hex(authority.intermediate),
                sha256=pki.fingerprint(cert),
                peer=None,
            )
        )
        log.info(
            "serving certificate serial=%s not_after=%s",
            pki.serial_hex(cert),
            pki.rfc3339(cert.not_valid_after_utc),
        )
        return Active(authority, ctx, cert.not_valid_after_utc)

    async def renew_server_cert_forever(self) -> None:
        """Re-issue the serving certificate at half its lifetime; never dies."""
        while True:
            left = (self.active.serving_expires - self.clock()).total_seconds()
            await asyncio.sleep(max(1.0, left / 2))
            try:
                await self.swap(self._renew_serving)
            except Exception:
                log.exception("renewing the serving certificate failed; retrying in 60 s")
                await asyncio.sleep(60)

    # -- handlers ---------------------------------------------------------

    async def post_certificates(self, request: web.Request) -> web.Response:
        """POST /v1/certificates: enroll with a token, or renew over mTLS."""
        peer = request.remote
        start = time.perf_counter()
        try:
            try:
                check_source(request)
                body = await read_limited(request, self.config.max_body)
                bearer = bearer_token(request)
            except MeshcaError as err:
                await self.blocking(self.enroller.record_refusal, err, NONE, None, peer)
                raise
            issued = await self.enroller.enroll(body, bearer, peer_certificate(request), peer)
        except Exception:
            self.metrics.enrollment(metrics.REFUSED, time.perf_counter() - start)
            raise
        self.metrics.enrollment(metrics.ISSUED, time.perf_counter() - start)
        self.metrics.issued(self._credential_of(bearer))
        request["spiffe_id"] = str(issued.spiffe_id)
        return json_response(issued.to_json())

    def _credential_of(self, bearer: str | None) -> str:
        """The credential an enrollment that succeeded was authenticated with, by the
        Enroller's rule: a bearer token if there is one (a join token if this CA issued
        it, else a ServiceAccount token: no other issuer passes), else the client
        certificate (a renewal)."""
        if bearer is None:
            return metrics.MTLS_RENEWAL
        if peek_issuer(bearer) == self.enroller.join_tokens.issuer:
            return metrics.JOIN_TOKEN
        return metrics.K8S_TOKEN

    async def post_jwt(self, request: web.Request) -> web.Response:
        """POST /v1/jwt: a JWT-SVID for the mTLS caller's own ID, for the audience asked."""
        check_source(request)
        body = await read_limited(request, 4096)
        cert = peer_certificate(request)
        if cert is None:
            raise Unauthenticated(
                "JWT-SVIDs are issued over mTLS only: present your certificate",
                code="missing_credential",
            )
        now = self.clock()
        sid, _ = await self.blocking(self.enroller.check_peer_svid, cert, now)
        request["spiffe_id"] = str(sid)
        doc = json_object(body, {"audience", "ttl"})
        audience = check_audience(doc.get("audience"))
        ttl = doc.get("ttl", DEFAULT_TTL.total_seconds())
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise BadRequest("field 'ttl' must be a number of seconds", code="bad_json")
        wait = self.jwt_limiter.check(str(sid))
        if wait > 0:
            raise RateLimited(f"too many JWT requests for {sid}", retry_after=wait)
        minted = self.jwt_issuer.mint(sid, audience, now, dt.timedelta(seconds=ttl))
        self.metrics.jwt_svid()
        return json_response({"token": minted.token, "expires_at": pki.rfc3339(minted.expires_at)})

    async def admin_identity(self, request: web.Request) -> SpiffeId:
        """The caller, if it is one of the configured admin identities (mTLS or SA token)."""
        check_source(request)
        now = self.clock()
        bearer = bearer_token(request)
        if bearer is not None:
            k8s = self.enroller.k8s
            if k8s is None or peek_issuer(bearer) != k8s.issuer:
                raise Unauthenticated(
                    "admin calls take a client certificate or a Kubernetes ServiceAccount token",
                    code="invalid_token",
                )
            sid = await k8s.verify(bearer, now)
        else:
            cert = peer_certificate(request)
            if cert is None:
                raise Unauthenticated(
                    "admin calls need a client certificate or a ServiceAccount token",
                    code="missing_credential",
                )
            sid, _ = await self.blocking(self.enroller.check_peer_svid, cert, now)
        request["spiffe_id"] = str(sid)
        if str(sid) not in self.config.admin_ids:
            log.warning("refused admin call from %s", sid)
            raise Forbidden(f"{sid} is not an admin identity")
        return sid

    async def post_admin_rotate(self, request: web.Request) -> web.Response:
        """POST /v1/admin/rotate: one rotation step, as `meshca rotate --home` would take."""
        from meshca import rotation_plan as rotation
        from meshca.rotate import rotate

        who = await self.admin_identity(request)
        doc = json_object(
            await read_limited(request, 4096),
            {
                "dry_run",
                "force_intermediate",
                "start_root_rotation",
                "force_retire",
                "propagation_wait",
                "retire_wait",
                "intermediate_share",
                "root_share",
            },
        )
        flags = {}
        for k in ("dry_run", "force_intermediate", "start_root_rotation", "force_retire"):
            v = doc.get(k, False)
            if not isinstance(v, bool):
                raise BadRequest(f"field {k!r} must be true or false", code="bad_json")
            flags[k] = v
        nums = {}
        defaults = rotation.Settings()
        for k, default in (
            ("propagation_wait", defaults.propagation_wait.total_seconds()),
            ("retire_wait", defaults.retire_wait.total_seconds()),
            ("intermediate_share", defaults.intermediate_share),
            ("root_share", defaults.root_share),
        ):
            v = doc.get(k, default)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise BadRequest(f"field {k!r} must be a non-negative number", code="bad_json")
            if k.endswith("share") and not 0 < v < 1:
                raise BadRequest(f"field {k!r} must be between 0 and 1", code="bad_json")
            nums[k] = float(v)
        settings = rotation.Settings(
            intermediate_share=nums["intermediate_share"],
            root_share=nums["root_share"],
            propagation_wait=dt.timedelta(seconds=nums["propagation_wait"]),
            retire_wait=dt.timedelta(seconds=nums["retire_wait"]),
        )
        result = await asyncio.to_thread(
            rotate,
            self.store_for_change(),
            settings,
            flags["force_intermediate"],
            flags["start_root_rotation"],
            flags["dry_run"],
            self.clock,
            True,
            flags["force_retire"],
        )
        await self.swap(self.reload_if_changed)  # apply it now, not at the next poll
        log.info("admin %s rotate: %s (%s)", who, result["action"], result["reason"])
        return json_response(result)

    async def post_admin_revoke(self, request: web.Request) -> web.Response:
        """POST /v1/admin/revoke: body {"serial": HEX} or {"spiffe_id": ID[, "ban_for": S]}."""
        from meshca.revocation import revoke

        who = await self.admin_identity(request)
        doc = json_object(await read_limited(request, 4096), {"serial", "spiffe_id", "ban_for"})
        serial, sid, ban_for = doc.get("serial"), doc.get("spiffe_id"), doc.get("ban_for")
        if (serial is None) == (sid is None):
            raise BadRequest("give exactly one of 'serial' or 'spiffe_id'", code="bad_json")
        if not isinstance(serial or sid, str):
            raise BadRequest("serial / spiffe_id must be a string", code="bad_json")
        if ban_for is not None and (
            isinstance(ban_for, bool) or not isinstance(ban_for, int | float)
        ):
            raise BadRequest("field 'ban_for' must be a number of seconds", code="bad_json")
        period = dt.timedelta(seconds=ban_for) if ban_for is not None else None
        where = self.store_for_change()
        result = await asyncio.to_thread(revoke, where, serial, sid, period, self.clock)
        log.info("admin %s revoked %d certificate(s)", who, len(result["revoked"]))
        return json_response(result)

    async def post_admin_unrevoke(self, request: web.Request) -> web.Response:
        """POST /v1/admin/unrevoke: body {"spiffe_id": ID}; the ID may enroll again."""
        from meshca.revocation import unrevoke

        who = await self.admin_identity(request)
        doc = json_object(await read_limited(request, 4096), {"spiffe_id"})
        sid = doc.get("spiffe_id")
        if not isinstance(sid, str):
            raise BadRequest("field 'spiffe_id' (a string) is required", code="bad_json")
        result = await asyncio.to_thread(unrevoke, self.store_for_change(), sid)
        log.info("admin %s unblocked %s", who, sid)
        return json_response(result)

    async def post_inject(self, request: web.Request) -> web.Response:
        """POST /v1/inject: the mutating admission webhook (AdmissionReview v1 -> JSONPatch)."""
        from meshca.inject import InjectError, InjectOptions, admission_response

        body = await read_limited(request, 4 << 20)
        try:
            review = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("body is not valid JSON", code="bad_json") from None
        opts = InjectOptions(
            image=self.config.inject_image,
            ca_url=self.config.inject_ca_url,
            trust_domain=self.authority.trust_domain,
        )
        try:
            answer = admission_response(review, opts, self.config.inject_fail_open)
        except InjectError as e:
            raise BadRequest(str(e), code="bad_admission_review") from None
        return json_response(answer)

    async def get_jwks(self, request: web.Request) -> web.Response:
        """GET /v1/jwks: the keys that verify this CA's JWT-SVIDs."""
        return json_response(self.jwt_issuer.jwks(), headers={"Cache-Control": "max-age=60"})

    async def get_bundle(self, request: web.Request) -> web.Response:
        """GET /v1/bundle: the trust bundle, with an ETag for cheap polling."""
        authority = self.authority
        doc = {
            "trust_domain": authority.trust_domain,
            "roots": authority.bundle_pem(),
            "sequence": authority.state.sequence,
            "revoked": await self.blocking(self.ledger.revoked_serials),
            "endorsements": authority.endorsements_pem(self.clock()),
        }
        body = json.dumps(doc, sort_keys=True).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        inm = request.headers.get("If-None-Match", "")
        if etag in (t.strip() for t in inm.split(",")):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(
            body=body + b"\n",
            content_type="application/json",
            headers={"ETag": etag, "Cache-Control": "no-cache"},
        )

    async def get_healthz(self, request: web.Request) -> web.Response:
        """GET /healthz: liveness (never depends on the store: an outage of the database
        must not restart every replica)."""
        return json_response({"status": "ok", "trust_domain": self.authority.trust_domain})

    async def get_readyz(self, request: web.Request) -> web.Response:
        """GET /readyz: 200 while the store answers (checked at most once a second), else
        503: a replica that cannot record issuances takes no traffic."""
        loop = asyncio.get_running_loop()
        if self.offload and loop.time() - self._ready_at >= READY_TTL:
            self._ready_at = loop.time()
            ping = getattr(self.state_store, "ping", None)
            try:
                if ping is not None:
                    await self.blocking(ping)
                self._ready_error = None
            except MeshcaError as e:
                self._ready_error = e.detail
        if self._ready_error is not None:
            raise Unavailable(self._ready_error)
        return json_response(
            {
                "status": "ready",
                "trust_domain": self.authority.trust_domain,
                "store": self.state_store.kind,
                "revision": self._state_revision,
            }
        )

    def _ledger_counts(self) -> metrics.LedgerCounts:
        """Runs on the metrics thread, which keeps its own connection to the ledger."""
        if self._metrics_ledger is None:
            # (a remote ledger is thread-safe: the server's own one serves)
            self._metrics_ledger = (
                self.ledger if self.offload else StateDir(self.config.home).ledger(self.clock)
            )
        counts = self._metrics_ledger.counts()
        return metrics.LedgerCounts(counts["issued"], counts["revoked"])

    async def get_metrics(self, request: web.Request) -> web.Response:
        """GET /metrics (the metrics listener): Prometheus text, or OpenMetrics if asked."""
        loop = asyncio.get_running_loop()
        # The counts scan tables: at most one scan every LEDGER_COUNT_TTL seconds, however
        # often (or by whom) /metrics is asked; scrapes in between reuse the last counts.
        now = loop.time()
        if now - self._ledger_counted_at >= LEDGER_COUNT_TTL:
            self._ledger_counted_at = now
            try:
                self.metrics.ledger = await loop.run_in_executor(
                    self._metrics_thread, self._ledger_counts
                )
            except Exception as e:
                # Leave the ledger's gauges out rather than report stale numbers.
                log.warning("metrics: cannot count the ledger's rows: %s: %s", type(e).__name__, e)
                self.metrics.ledger = None
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(
            body=encoder(self.metrics.registry), headers={"Content-Type": content_type}
        )

    def metrics_app(self) -> web.Application:
        """The aiohttp application of the plain-HTTP metrics listener: GET /metrics only."""
        app = web.Application()
        app.router.add_get("/metrics", self.get_metrics)
        return app

    def app(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(
            middlewares=[errors_and_access_log], client_max_size=self.config.max_body
        )
        app[AUTH_FAILURES] = RateLimiter(self.config.auth_fail_rate, self.config.auth_fail_burst)
        app[METRICS] = self.metrics
        app.router.add_post("/v1/certificates", self.post_certificates)
        app.router.add_get("/v1/bundle", self.get_bundle)
        app.router.add_post("/v1/jwt", self.post_jwt)
        app.router.add_get("/v1/jwks", self.get_jwks)
        app.router.add_post("/v1/inject", self.post_inject)
        app.router.add_post("/v1/admin/rotate", self.post_admin_rotate)
        app.router.add_post("/v1/admin/revoke", self.post_admin_revoke)
        app.router.add_post("/v1/admin/unrevoke", self.post_admin_unrevoke)
        app.router.add_get("/healthz", self.get_healthz)
        app.router.add_get("/readyz", self.get_readyz)
        return app

    async def close(self) -> None:
        """Release the ledgers (the metrics thread's too) and any JWKS session."""
        if self.jwks is not None:
            await self.jwks.close()
        self.ledger.close()
        metrics_ledger = self._metrics_ledger
        if metrics_ledger is not None and metrics_ledger is not self.ledger:
            await asyncio.get_running_loop().run_in_executor(
                self._metrics_thread, metrics_ledger.close
            )
        self._metrics_thread.shutdown(wait=False)
        self.state_store.close()


async def _drain_connections(server: web.Server, timeout: float) -> None:
    """Close idle kept-alive connections now; give busy ones up to `timeout` seconds to
    answer (the answer closes the connection: `close_after` in `serve`).

    aiohttp's own graceful shutdown alone would not do: from its first step it drops
    whatever a client still sends (RequestHandler.data_received returns once the
    handler is closing), so a request whose body was still arriving could never finish.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        busy = 0
        for handler in server.connections:
            if getattr(handler, "_request_in_progress", False):
                busy += 1
            else:
                # Idle: close the transport now (TLS close_notify). close() alone only
                # cancels the wait for a next request and leaves the socket open.
                handler.force_close()
        if not busy or loop.time() >= deadline:
            if busy:
                log.warning("drain time over: %d request(s) still running are cut off", busy)
            return
        await asyncio.sleep(0.05)


def _url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def _start_metrics(ca: CAServer, where: Listen) -> tuple[web.AppRunner, str]:
    """The plain-HTTP metrics listener (separate from the API: no TLS, nothing but /metrics)."""
    runner = web.AppRunner(ca.metrics_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        sock = listener.bind(where.host, where.port, backlog=128)
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, _url("http", where.host, sock.getsockname()[1])


async def serve(
    config: ServeConfig,
    ready: Callable[[str], None] | None = None,
    metrics_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the CA until SIGTERM or SIGINT; `ready` gets the bound URL once listening, and
    `metrics_ready` the metrics listener's URL (with `config.metrics_listen`) just before.

    On the signal it stops accepting, lets in-flight requests finish (at most
    `drain_timeout` seconds; their responses say `Connection: close`), closes
    idle kept-alive connections, then returns.
    """
    ca = CAServer(config)
    metrics_runner = None
    if config.metrics_listen is not None:
        # Bound first: a port already taken stops the start before the API is served.
        metrics_runner, metrics_url = await _start_metrics(ca, config.metrics_listen)
        log.info("metrics on %s/metrics", metrics_url)
        if metrics_ready:
            metrics_ready(metrics_url)
    app = ca.app()
    stopping = asyncio.Event()

    async def close_after(_request: web.Request, response: web.StreamResponse) -> None:
        if stopping.is_set():
            # The headers are computed before this hook runs (aiohttp 3.14): say it here.
            response.headers["Connection"] = "close"
            response.force_close()  # and close after this response

    app.on_response_prepare.append(close_after)
    # What _drain leaves is given a moment more by aiohttp's own shutdown, then cancelled.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    sock = listener.bind(config.listen.host, config.listen.port, backlog=1024)
    server = runner.server
    assert server is not None
    lst = listener.Listener(
        sock,
        server,
        ssl_context=ca.listener_context,
        max_connections=config.max_connections,
        handshake_timeout=HANDSHAKE_TIMEOUT,
        name="meshca",
    )
    # aiohttp tells its Server about every connection that ends; the listener counts them.
    lost = server.connection_lost

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        lost(handler, exc)
        lst.release()

    server.connection_lost = connection_lost  # type: ignore[method-assign]
    lst.start()
    url = _url("https", config.listen.host, lst.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    ca.url = url
    ca._loop = loop
    renewer = asyncio.create_task(ca.renew_server_cert_forever())
    watcher = asyncio.create_task(ca.watch_state_forever())
    # A shared store tells of changes made through other replicas (NOTIFY); the watcher
    # reloads at once then, and polls meanwhile in case a notification is lost.
    listen = getattr(ca.state_store, "listen", None)
    stop_listening = threading.Event()
    listener_thread = None
    if listen is not None:
        listener_thread = threading.Thread(
            target=listen,
            args=(ca.state_changed, stop_listening),
            name="meshca-state-listener",
            daemon=True,
        )
        listener_thread.start()
    log.info("serving trust domain %s on %s", ca.authority.trust_domain, url)
    if ready:
        ready(url)
    try:
        await stopping.wait()
        log.info(
            "stopping: no new connections; draining %d open (at most %g s)",
            len(server.connections),
            config.drain_timeout,
        )
    finally:
        stopping.set()
        stop_listening.set()
        lst.close()
        for task in (renewer, watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await _drain_connections(server, config.drain_timeout)
        await runner.cleanup()
        if metrics_runner is not None:  # scraped until the API has drained
            await metrics_runner.cleanup()
        await ca.close()
        log.info("stopped")
