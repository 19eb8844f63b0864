"""The pod's current credentials: key, chain, trust bundle, and the TLS contexts made from them.

The writer (the certificate manager) builds and checks a complete new
`Credentials` before publishing it with one assignment; every new handshake
reads the latest. The trusted roots come from the TrustStore (sidecar.identity.trust),
and a change there republishes the same key and chain with new contexts.
Inbound listeners get it through an SNI callback that swaps in the current
context per handshake, so a renewal or a new bundle takes effect
at once while open connections keep the context they started with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification as xv

from meshca import tlsutil
from meshca.spiffe import SpiffeId
from meshca.svid import SvidError, leaf_problem, serial_hex, spiffe_id_of
from meshca.tlsutil import no_resumption, resumable
from sidecar.identity.trust import TrustBundle, TrustStore
from sidecar.protocols import CLIENT_ALPN, HTTP, accepted_alpn

log = logging.getLogger("sidecar.creds")


__all__ = ["leaf_problem", "serial_hex", "spiffe_id_of"]  # X.509-SVID rules: meshca.svid


class CredentialError(ValueError):
    """A certificate, chain or bundle is unusable; the message says which and why."""


def chain_valid(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: list[x509.Certificate],
    now: dt.datetime,
) -> bool:
    """True if `leaf` chains to `roots` at `now` (cryptography's path validation)."""
    if not roots:
        return False
    try:
        verifier = xv.PolicyBuilder().store(xv.Store(roots)).time(now).build_client_verifier()
        verifier.verify(leaf, intermediates)
    except xv.VerificationError:
        return False
    return True


SESSIONS_KEPT = 1024  # server names a client context keeps a session for


class ResumingClientContext(ssl.SSLContext):
    """A client context that offers the session it kept last for a server name (a TLS 1.3
    or 1.2 ticket), so a new connection to a sidecar it talked to resumes instead of
    repeating the full handshake. asyncio's `create_connection` cannot pass a session, but
    it makes each connection's SSLObject with this context's `wrap_bio`.

    Sessions live with the context: a generation of credentials (certificate and roots)
    has its own, so new roots or a new certificate start afresh. A resumed session
    verifies no chain: the caller still checks the certificate it carries (identity,
    revocation, validity now)."""

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        """`SSLContext.wrap_bio`, offering the kept session for `server_hostname`."""
        if session is None and not server_side and isinstance(server_hostname, str):
            session = self.__dict__.get("_sessions", {}).get(server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def keep(self, server_hostname: str, sslobj: ssl.SSLObject) -> None:
        """Keep the session of a connection that has read from its server (a TLS 1.3 ticket
        comes after the handshake), if it can be resumed."""
        session = sslobj.session
        if session is None or not session.has_ticket:
            return
        sessions: dict[str, ssl.SSLSession] = self.__dict__.setdefault("_sessions", {})
        if len(sessions) >= SESSIONS_KEPT and server_hostname not in sessions:
            sessions.clear()
        sessions[server_hostname] = session


@dataclass(frozen=True)
class Credentials:
    """One consistent generation of key + chain + bundle, with its TLS contexts."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    chain_pem: str = field(repr=False)
    bundle_pem: str = field(repr=False)
    key_pem: bytes = field(repr=False)
    server_context: ssl.SSLContext = field(repr=False)
    client_context: ssl.SSLContext = field(repr=False)  # offers HTTP/1.1 (client_contexts[HTTP])
    # Outbound, by the protocol spoken to the other sidecar (the ALPN names offered differ).
    client_contexts: dict[str, ssl.SSLContext] = field(default_factory=dict, repr=False)
    server_alpn: tuple[str, ...] = accepted_alpn(HTTP)
    # The leaf's validity and serial, read once: readiness probes, metrics scrapes and the
    # renewal timer then run no X.509 code (which would map cryptography's pages back in)
    not_before: dt.datetime = dt.datetime.min.replace(tzinfo=dt.UTC)
    not_after: dt.datetime = dt.datetime.min.replace(tzinfo=dt.UTC)
    serial: str = ""

    @classmethod
    def build(
        cls,
        key_pem: bytes,
        chain_pem: str,
        bundle_pem: str,
        trust_domain: str,
        now: dt.datetime,
        require_chain: bool = True,
        alpn: tuple[str, ...] = accepted_alpn(HTTP),
    ) -> Credentials:
        """Check everything, then build the contexts; CredentialError if anything is off.

        `require_chain=False` is for a new bundle that no longer holds the root of a
        certificate we already have (the CA retired it): the contexts trust the new
        roots at once, and the certificate manager is told to renew.
        """
        try:
            certs = x509.load_pem_x509_certificates(chain_pem.encode())
            roots = x509.load_pem_x509_certificates(bundle_pem.encode())
        except ValueError:
            raise CredentialError("chain or bundle is not PEM certificates") from None
        leaf, intermediates = certs[0], certs[1:]
        try:
            sid = spiffe_id_of(leaf)
        except SvidError as e:
            raise CredentialError(str(e)) from None
        if sid.trust_domain != trust_domain:
            raise CredentialError(f"certificate ID {sid} is not in trust domain {trust_domain}")
        key = serialization.load_pem_private_key(key_pem, password=None)
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise CredentialError("certificate does not match the private key")
        if require_chain and not chain_valid(leaf, intermediates, roots, now):
            raise CredentialError("certificate does not chain to the trust bundle")

        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        server.verify_mode = ssl.CERT_REQUIRED
        # Resumed only within this generation: a new certificate or new roots make a new
        # context, whose ticket keys and session cache are its own (see tlsutil.resumable).
        resumable(server)
        server.load_verify_locations(cadata=bundle_pem)
        server.set_alpn_protocols(list(alpn))
        tlsutil.load_chain(server, chain_pem, key_pem)

        clients: dict[str, ssl.SSLContext] = {}
        for proto, names in CLIENT_ALPN.items():
            client = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
            client.minimum_version = ssl.TLSVersion.TLSv1_2
            client.check_hostname = False  # peers are checked by SPIFFE ID, not DNS name
            client.verify_mode = ssl.CERT_REQUIRED
            client.load_verify_locations(cadata=bundle_pem)
            client.set_alpn_protocols(list(names))
            tlsutil.load_chain(client, chain_pem, key_pem)
            clients[proto] = client
        return cls(
            sid,
            leaf,
            tuple(intermediates),
            tuple(roots),
            chain_pem,
            bundle_pem,
            key_pem,
            server,
            clients[HTTP],
            clients,
            tuple(alpn),
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
            serial_hex(leaf),
        )

    def with_bundle(self, bundle_pem: str, now: dt.datetime) -> Credentials:
        """The same key and certificate with contexts that trust `bundle_pem`."""
        return Credentials.build(
            self.key_pem,
            self.chain_pem,
            bundle_pem,
            self.spiffe_id.trust_domain,
            now,
            require_chain=False,
            alpn=self.server_alpn,
        )

    def chains_now(self, now: dt.datetime) -> bool:
        """True if our certificate chains to the roots these contexts trust."""
        return chain_valid(self.leaf, list(self.intermediates), list(self.roots), now)

    def describe(self, now: dt.datetime) -> dict[str, object]:
        """What `GET /identity` and `sidecar identity` show."""
        nb, na = self.not_before, self.not_after
        return {
            "spiffe_id": str(self.spiffe_id),
            "serial": self.serial,
            "issuer": self.leaf.issuer.rfc4514_string(),
            "not_before": nb.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "not_after": na.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds_remaining": max(0, int((na - now).total_seconds())),
            "sha256": hashlib.sha256(
                self.leaf.public_bytes(serialization.Encoding.DER)
            ).hexdigest(),
            "chain_valid": chain_valid(self.leaf, list(self.intermediates), list(self.roots), now),
            "expired": now >= na,
        }


class CredentialStore:
    """Holds the current Credentials; `ready` is a latch set by the first publish.

    The trust bundle is not ours: the TrustStore owns it. When its roots change,
    the current key and certificate are republished with contexts that trust the
    new roots, so the next handshake (inbound, outbound, `sidecar check`) uses them.
    """

    def __init__(
        self,
        trust: TrustStore,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        alpn: tuple[str, ...] = accepted_alpn(HTTP),
    ) -> None:
        self.trust = trust
        self.alpn = alpn  # what the inbound listener accepts (the app's protocol decides)
        self.trust_domain = trust.trust_domain
        self.clock = clock
        self._current: Credentials | None = None
        self._listeners: list[Callable[[Credentials], None]] = []
        self._stale_listeners: list[Callable[[], None]] = []
        self._not_ready: ssl.SSLContext | None = None
        trust.on_roots(self._roots_changed)

    @property
    def revoked(self) -> frozenset[str]:
        """Serials (lowercase hex) the CA revoked, from the trust bundle."""
        return self.trust.current.revoked

    def on_revoked(self, fn: Callable[[frozenset[str]], None]) -> None:
        """Call `fn` whenever the revoked set changes."""
        self.trust.on_revoked(fn)

    def on_stale(self, fn: Callable[[], None]) -> None:
        """Call `fn` when our certificate stops chaining to the trusted roots (renew now)."""
        self._stale_listeners.append(fn)

    def _roots_changed(self, bundle: TrustBundle) -> None:
        creds = self._current
        if creds is None or creds.bundle_pem == bundle.pem:
            return
        now = self.clock()
        try:
            rebuilt = creds.with_bundle(bundle.pem, now)
        except CredentialError as e:  # cannot happen for a checked bundle; keep serving
            log.error("cannot trust the new bundle for handshakes: %s", e)
            return
        self._publish(rebuilt)
        if not rebuilt.chains_now(now):
            log.error(
                "our certificate (serial %s) does not chain to the new trust bundle; renewing",
                rebuilt.serial,
            )
            for fn in self._stale_listeners:
                fn()

    @property
    def current(self) -> Credentials | None:
        """The latest published credentials (None until enrolled)."""
        return self._current

    @property
    def ready(self) -> bool:
        """True once a certificate is held."""
        return self._current is not None

    def publish(self, creds: Credentials) -> None:
        """Swap in a complete, checked generation (its contexts trust the current bundle)."""
        bundle = self.trust.current
        if creds.bundle_pem != bundle.pem:
            creds = creds.with_bundle(bundle.pem, self.clock())
        self._publish(creds)

    def _publish(self, creds: Credentials) -> None:
        self._current = creds
        for fn in self._listeners:
            fn(creds)

    def on_publish(self, fn: Callable[[Credentials], None]) -> None:
        """Call `fn` after every publish (for example, to close revoked connections later)."""
        self._listeners.append(fn)

    def server_context(self) -> ssl.SSLContext:
        """The context a new inbound connection is served with: the current generation's
        own (so its TLS sessions are resumable within that generation only), or, before
        the first certificate, one that fails every handshake."""
        creds = self._current
        if creds is not None:
            return creds.server_context
        if self._not_ready is None:
            self._not_ready = self.listener_context()
        return self._not_ready

    def listener_context(self) -> ssl.SSLContext:
        """A server context for a listening socket that always serves the current credentials.

        Its SNI callback (called for every ClientHello, with or without SNI) moves the
        handshake onto the current generation's context; before the first certificate
        it fails the handshake (fail closed until ready).
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        no_resumption(ctx)  # the session keys live here, on the context that outlives swaps

        def pick(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> int | None:
            creds = self._current
            if creds is None:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            sslobj.context = creds.server_context
            return None

        ctx.sni_callback = pick
        return ctx
