"""The peer of a connection, as the sidecar verified it: a typed record and the one check.

Inbound, the peer is another sidecar's client certificate; outbound, the
server certificate of the sidecar called. Both pass the same check
(`verify_der`: the TLS handshake verified the chain against the trust bundle,
then `meshca.svid.verify_peer` requires a leaf with one SPIFFE ID of the trust
domain, not revoked, and, outbound, the expected ID). The app on loopback is
`LOCAL_APP`: it has no certificate.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from collections.abc import Container
from dataclasses import dataclass

from cryptography import x509

from meshca.spiffe import SpiffeId
from meshca.svid import SvidError, SvidFacts, check_svid, svid_facts


class Verdict(enum.StrEnum):
    """How the peer's identity is known."""

    VERIFIED = "verified"  # chain checked in the handshake, X.509-SVID rules after it
    LOCAL = "local"  # the app on loopback: no certificate, no identity


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of a connection."""

    spiffe_id: str | None
    verdict: Verdict = Verdict.LOCAL
    serial: str | None = None  # the certificate's serial, as the ledger writes it
    cert_sha256: str | None = None  # hex digest of the certificate DER (XFCC's Hash)
    original_dst: str | None = None  # outbound, intercepted: where the app was going


LOCAL_APP = Peer(None)


def verify_der(
    der: bytes,
    trust_domain: str,
    revoked: Container[str],
    expect: SpiffeId | None = None,
    now: dt.datetime | None = None,
) -> Peer:
    """The peer a chain-verified certificate (DER) names; SvidError names the rule it breaks
    (`bad_certificate` for one that does not parse).

    What a certificate says is read once per certificate and kept (`PARSED`, bounded):
    a peer reconnecting with the same leaf costs a dictionary lookup, not an X.509 parse
    (most of the Python work of an accepted connection). The rules that depend on the
    moment (the revocation list, the identity expected) are checked every time; `now`
    adds the validity period (a resumed TLS session did not check it again)."""
    hit = _parsed.get(der)
    if hit is None:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as e:
            raise SvidError("bad_certificate", f"certificate does not parse: {e}") from None
        facts = svid_facts(cert)
        if len(_parsed) >= PARSED:
            _parsed.clear()
        hit = _parsed[der] = (facts, hashlib.sha256(der).hexdigest())
    facts, digest = hit
    peer_id = check_svid(facts, trust_domain, revoked, expect, now)
    return Peer(str(peer_id), Verdict.VERIFIED, facts.serial, digest)


PARSED = 1024  # certificates whose facts are kept (cleared whole when full)
_parsed: dict[bytes, tuple[SvidFacts, str]] = {}
