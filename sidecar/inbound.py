"""The inbound listener: mTLS termination in front of the app.

Only peers with a certificate that chains to the current bundle (checked in
the handshake) and carries exactly one SPIFFE ID of our trust domain (checked
right after it, before any byte is read) get through. Client-supplied identity
headers are removed and the sidecar's own `X-Forwarded-Client-Cert` (Envoy's
format) is added; the request then goes to the app on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from cryptography import x509

from sidecar.config import InboundConfig
from sidecar.creds import CredentialError, CredentialStore, spiffe_id_of
from sidecar.proxy import (
    DownstreamConn,
    Exchange,
    ProxyError,
    Router,
    UpstreamConn,
    UpstreamPool,
    strip_hop_by_hop,
)

log = logging.getLogger("sidecar.inbound")

# Headers only the sidecar may set for the app; a client's copies are removed first.
SIDECAR_HEADERS = frozenset({b"x-forwarded-client-cert", b"x-forwarded-proto"})


def xfcc(own_id: str, peer_der: bytes, peer_id: str) -> bytes:
    """`By=<own id>;Hash=<sha256 hex of the peer certificate DER>;URI=<peer id>`."""
    digest = hashlib.sha256(peer_der).hexdigest()
    return f"By={own_id};Hash={digest};URI={peer_id}".encode()


class InboundRouter(Router):
    """Checks the peer's SPIFFE ID and forwards to the app on loopback."""

    direction = "inbound"

    def __init__(self, cfg: InboundConfig, store: CredentialStore) -> None:
        self.cfg = cfg
        self.store = store
        self.pool = UpstreamPool(
            "app",
            [(cfg.app.host, cfg.app.port)],
            self._connect,
            cfg.connect_timeout,
            unavailable=(503, "app_unavailable"),
        )
        self._default_host = f"{cfg.app.host}:{cfg.app.port}".encode()

    async def _connect(self, pool: UpstreamPool, host: str, port: int) -> UpstreamConn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: UpstreamConn(pool), host, port)
        return conn

    def accept(self, conn: DownstreamConn) -> None:
        """Require exactly one SPIFFE ID in our trust domain (the chain was verified by TLS)."""
        assert conn.transport is not None
        sslobj = conn.transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            raise ProxyError(400, "no_client_certificate", "a client certificate is required")
        try:
            peer = spiffe_id_of(x509.load_der_x509_certificate(der))
        except (CredentialError, ValueError) as e:
            raise ProxyError(403, "bad_peer_certificate", str(e)) from None
        if peer.trust_domain != self.store.trust_domain:
            raise ProxyError(403, "foreign_trust_domain", f"{peer} is not in our trust domain")
        creds = self.store.current
        own = str(creds.spiffe_id) if creds is not None else ""
        conn.peer = {"spiffe_id": str(peer), "xfcc": xfcc(own, der, str(peer))}

    def route(self, conn: DownstreamConn, ex: Exchange) -> tuple[UpstreamPool, bytes]:
        """The request for the app: origin-form target, identity headers rewritten."""
        if not (ex.target.startswith(b"/") or (ex.target == b"*" and ex.method == b"OPTIONS")):
            raise ProxyError(400, "bad_request_target", "request target must be a path")
        if ex.method == b"CONNECT":
            raise ProxyError(405, "method_not_allowed", "CONNECT is not supported")
        headers = strip_hop_by_hop(ex.headers, SIDECAR_HEADERS)
        lines = [b"%s %s HTTP/1.1\r\n" % (ex.method, ex.target)]
        has_host = False
        for k, v in headers:
            if not has_host and k.lower() == b"host":
                has_host = True
            lines.append(b"%s: %s\r\n" % (k, v))
        if not has_host:
            lines.append(b"host: %s\r\n" % self._default_host)
        lines.append(b"x-forwarded-client-cert: %s\r\n" % conn.peer["xfcc"])
        lines.append(b"x-forwarded-proto: https\r\n")
        return self.pool, b"".join(lines)
