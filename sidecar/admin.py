"""The admin endpoint (loopback only) and the kubelet's health port.

Admin: `GET /healthz`, `GET /ready`, `GET /identity`, `GET /status`,
`POST /rotate`, `POST /check?target=HOST:PORT[&expect=ID]`, `GET /policy`.
Health port: only `GET /healthz/ready`. Errors are JSON `{"error", "detail"}`;
nothing here ever returns a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ssl
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.client import CAError
from meshca.svid import SvidError, serial_hex, spiffe_id_of, verify_peer
from sidecar.compiled import running
from sidecar.identity.bundlewatch import BundleWatcher
from sidecar.identity.certmanager import CertManager
from sidecar.identity.creds import Credentials, CredentialStore
from sidecar.localhttp import Request, Response, Routes
from sidecar.localhttp import json_response as _json
from sidecar.policy.holder import PolicyHolder


async def _peer_cert(host: str, port: int, ctx: ssl.SSLContext) -> x509.Certificate:
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname=None), timeout=10
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


async def check_peer(
    creds: Credentials,
    host: str,
    port: int,
    expect: str | None,
    now: dt.datetime,
    revoked: frozenset[str] = frozenset(),
) -> dict[str, object]:
    """Handshake with the pod's certificate; report the peer's ID, chain and validity."""
    doc: dict[str, object] = {"target": f"{host}:{port}", "expected": expect}
    try:
        cert = await _peer_cert(host, port, creds.client_context)
        doc["chain_valid"] = True
    except ssl.SSLCertVerificationError as e:
        doc["chain_valid"] = False
        doc["chain_error"] = e.verify_message
        # Look again without verifying, only to say what the peer presented.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            cert = await _peer_cert(host, port, ctx)
        except (OSError, TimeoutError) as e2:
            doc["error"] = f"cannot connect: {e2}"
            return doc
    except (OSError, TimeoutError) as e:
        doc["chain_valid"] = False
        doc["error"] = f"cannot connect: {type(e).__name__}: {e}"
        return doc
    try:
        doc["spiffe_id"] = str(spiffe_id_of(cert))
        # The checks inbound and outbound make (the chain was verified, or said above).
        verify_peer(cert, creds.spiffe_id.trust_domain, revoked)
    except SvidError as e:
        doc.setdefault("spiffe_id", None)
        doc["error"] = e.detail
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    doc.update(
        serial=serial_hex(cert),
        issuer=cert.issuer.rfc4514_string(),
        not_before=nb.strftime("%Y-%m-%dT%H:%M:%SZ"),
        not_after=na.strftime("%Y-%m-%dT%H:%M:%SZ"),
        seconds_remaining=max(0, int((na - now).total_seconds())),
        sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )
    doc["identity_ok"] = expect is None or doc["spiffe_id"] == expect
    return doc


class Admin:
    """Routes of the admin and health listeners."""

    def __init__(
        self,
        store: CredentialStore,
        manager: CertManager,
        policy: PolicyHolder | None = None,
        bundle: BundleWatcher | None = None,
        endpoints: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.manager = manager
        self.policy = policy
        self.bundle = bundle
        self.endpoints_doc = endpoints  # each outbound service's endpoints and their state
        self.window: Any = None  # sidecar.telemetry.window.Window, the last minute of traffic
        self.inbound_tls: Callable[[], dict[str, int]] | None = None  # handshakes, full/resumed

    async def healthz(self, request: Request) -> Response:
        """Liveness: the process answers."""
        return _json({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 only while holding an unexpired certificate."""
        creds = self.store.current
        if creds is None:
            return _json({"ready": False, "reason": "no certificate yet"}, 503)
        if self.manager.clock() >= creds.not_after:
            return _json({"ready": False, "reason": "certificate expired"}, 503)
        return _json({"ready": True, "spiffe_id": str(creds.spiffe_id)})

    async def identity(self, request: Request) -> Response:
        """The current certificate, as `sidecar identity` prints it."""
        creds = self.store.current
        if creds is None:
            return _json({"error": "not_ready", "detail": "no certificate yet"}, 503)
        doc = creds.describe(self.manager.clock())
        doc["manager"] = self.manager.status.__dict__
        return _json(doc)

    async def policy_status(self, request: Request) -> Response:
        """The loaded policy: source, rules, last reload and the last reload error."""
        if self.policy is None:
            return _json({"error": "no_inbound", "detail": "no inbound listener, no policy"}, 404)
        return _json(self.policy.status())

    async def status(self, request: Request) -> Response:
        """The certificate manager's state, the trust bundle's (sequence, revocations), and
        whether the request path runs compiled (`sidecar.compiled`)."""
        doc: dict[str, object] = dict(self.manager.status.__dict__)
        doc["request_path"] = running()
        bundle = self.store.trust.current.describe()
        bundle["last_refusal"] = self.store.trust.last_refusal
        if self.bundle is not None:
            bundle.update(
                polls=self.bundle.polls,
                last_poll=self.bundle.last_success,
                last_error=self.bundle.last_error,
                endorsed_discoveries=self.bundle.discoveries,
            )
        doc["bundle"] = bundle
        if self.inbound_tls is not None:
            doc["inbound_tls_sessions"] = self.inbound_tls()
        return _json(doc)

    async def endpoints(self, request: Request) -> Response:
        """Each outbound service's endpoints: labels, weight, health, ejection, requests."""
        if self.endpoints_doc is None:
            return _json({"error": "no_outbound", "detail": "no outbound listener"}, 404)
        return _json({"services": self.endpoints_doc()})

    async def stats(self, request: Request) -> Response:
        """The last minute per peer and direction, as `sidecar stats` shows it."""
        if self.window is None:
            return _json({"error": "not_ready", "detail": "no listener yet"}, 503)
        return _json(self.window.snapshot())

    async def rotate(self, request: Request) -> Response:
        """Renew now; answers with the new serial, or 502 with why the CA did not."""
        try:
            serial = await self.manager.rotate_now()
        except CAError as e:
            return _json({"error": "rotation_failed", "detail": str(e)}, 502)
        creds = self.store.current
        assert creds is not None
        return _json({"serial": serial, "spiffe_id": str(creds.spiffe_id)})

    async def check(self, request: Request) -> Response:
        """Connect to `target` with the pod's certificate and describe the peer it finds."""
        target = request.query.get("target", "")
        expect = request.query.get("expect") or None
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            return _json({"error": "bad_target", "detail": "target must be HOST:PORT"}, 400)
        creds = self.store.current
        if creds is None:
            return _json({"error": "not_ready", "detail": "no certificate yet"}, 503)
        doc = await check_peer(
            creds, host.strip("[]"), int(port), expect, self.manager.clock(), self.store.revoked
        )
        return _json(doc)

    def admin_routes(self) -> Routes:
        """The loopback admin endpoint."""
        routes = Routes()
        routes.add("GET", "/healthz", self.healthz)
        routes.add("GET", "/ready", self.ready)
        routes.add("GET", "/identity", self.identity)
        routes.add("GET", "/status", self.status)
        routes.add("POST", "/rotate", self.rotate)
        routes.add("POST", "/check", self.check)
        routes.add("GET", "/policy", self.policy_status)
        routes.add("GET", "/endpoints", self.endpoints)
        routes.add("GET", "/stats", self.stats)
        return routes

    def health_routes(self) -> Routes:
        """The kubelet's probe port: readiness only, nothing else exposed."""
        routes = Routes()
        routes.add("GET", "/healthz/ready", self.ready)
        return routes
