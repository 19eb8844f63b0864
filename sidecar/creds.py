"""The pod's current credentials: key, chain, trust bundle, and the TLS contexts made from them.

The writer (the certificate manager) builds and checks a complete new
`Credentials` before publishing it with one assignment; every new handshake
reads the latest. Inbound listeners get it through an SNI callback that swaps
in the current context per handshake, so a renewal or a new bundle takes effect
at once while open connections keep the context they started with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification as xv

from meshca import tlsutil
from meshca.spiffe import InvalidSpiffeId, SpiffeId


class CredentialError(ValueError):
    """A certificate, chain or bundle is unusable; the message says which and why."""


def serial_hex(cert: x509.Certificate) -> str:
    """Serial as lowercase hex of whole bytes (the form the CA's bundle lists)."""
    text = format(cert.serial_number, "x")
    return "0" + text if len(text) % 2 else text


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE URI SAN of an SVID; CredentialError otherwise."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CredentialError("certificate has no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CredentialError(f"certificate has {len(uris)} URI SANs, an SVID has exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as e:
        raise CredentialError(f"certificate URI SAN is not a SPIFFE ID: {e}") from None


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
    client_context: ssl.SSLContext = field(repr=False)

    @classmethod
    def build(
        cls, key_pem: bytes, chain_pem: str, bundle_pem: str, trust_domain: str, now: dt.datetime
    ) -> Credentials:
        """Check everything, then build the contexts; CredentialError if anything is off."""
        try:
            certs = x509.load_pem_x509_certificates(chain_pem.encode())
            roots = x509.load_pem_x509_certificates(bundle_pem.encode())
        except ValueError:
            raise CredentialError("chain or bundle is not PEM certificates") from None
        leaf, intermediates = certs[0], certs[1:]
        sid = spiffe_id_of(leaf)
        if sid.trust_domain != trust_domain:
            raise CredentialError(f"certificate ID {sid} is not in trust domain {trust_domain}")
        key = serialization.load_pem_private_key(key_pem, password=None)
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise CredentialError("certificate does not match the private key")
        if not chain_valid(leaf, intermediates, roots, now):
            raise CredentialError("certificate does not chain to the trust bundle")

        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_verify_locations(cadata=bundle_pem)
        server.set_alpn_protocols(["http/1.1"])
        tlsutil.load_chain(server, chain_pem, key_pem)

        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        client.check_hostname = False  # peers are checked by SPIFFE ID, not DNS name
        client.verify_mode = ssl.CERT_REQUIRED
        client.load_verify_locations(cadata=bundle_pem)
        client.set_alpn_protocols(["http/1.1"])
        tlsutil.load_chain(client, chain_pem, key_pem)
        return cls(
            sid,
            leaf,
            tuple(intermediates),
            tuple(roots),
            chain_pem,
            bundle_pem,
            key_pem,
            server,
            client,
        )

    @property
    def serial(self) -> str:
        """Serial as lowercase hex of whole bytes."""
        text = format(self.leaf.serial_number, "x")
        return "0" + text if len(text) % 2 else text

    def describe(self, now: dt.datetime) -> dict[str, object]:
        """What `GET /identity` and `sidecar identity` show."""
        nb, na = self.leaf.not_valid_before_utc, self.leaf.not_valid_after_utc
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
    """Holds the current Credentials; `ready` is a latch set by the first publish."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._current: Credentials | None = None
        self._listeners: list[Callable[[Credentials], None]] = []
        self.revoked: frozenset[str] = frozenset()  # serials (lowercase hex) refused by the CA
        self._revocation_listeners: list[Callable[[frozenset[str]], None]] = []

    def set_revoked(self, serials: frozenset[str]) -> None:
        """Adopt the CA's list of revoked serials and tell the listeners (who close connections)."""
        if serials == self.revoked:
            return
        self.revoked = serials
        for fn in self._revocation_listeners:
            fn(serials)

    def on_revoked(self, fn: Callable[[frozenset[str]], None]) -> None:
        """Call `fn` whenever the revoked set changes."""
        self._revocation_listeners.append(fn)

    def adopt_bundle(self, bundle_pem: str, now: dt.datetime) -> bool:
        """Trust a new bundle for new handshakes (same key and certificate); False if our own
        certificate would not chain to it (then the old generation stays)."""
        creds = self._current
        if creds is None or creds.bundle_pem == bundle_pem:
            return False
        rebuilt = Credentials.build(
            creds.key_pem, creds.chain_pem, bundle_pem, self.trust_domain, now
        )
        self.publish(rebuilt)
        return True

    @property
    def current(self) -> Credentials | None:
        """The latest published credentials (None until enrolled)."""
        return self._current

    @property
    def ready(self) -> bool:
        """True once a certificate is held."""
        return self._current is not None

    def publish(self, creds: Credentials) -> None:
        """Swap in a complete, checked generation."""
        self._current = creds
        for fn in self._listeners:
            fn(creds)

    def on_publish(self, fn: Callable[[Credentials], None]) -> None:
        """Call `fn` after every publish (for example, to close revoked connections later)."""
        self._listeners.append(fn)

    def listener_context(self) -> ssl.SSLContext:
        """A server context for a listening socket that always serves the current credentials.

        Its SNI callback (called for every ClientHello, with or without SNI) moves the
        handshake onto the current generation's context; before the first certificate
        it fails the handshake (fail closed until ready).
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED

        def pick(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> int | None:
            creds = self._current
            if creds is None:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            sslobj.context = creds.server_context
            return None

        ctx.sni_callback = pick
        return ctx
