"""X.509-SVID rules in one place (shared by the CA and the sidecar).

The SPIFFE ID a certificate carries, what makes it a workload leaf, serials
written the way the ledger and the bundle write them, and `verify_peer()`: the
checks every party makes on a peer's certificate once TLS has verified its
chain (the sidecar's inbound and outbound paths, `sidecar check`, and the
CA's renewal and JWT-SVID paths). Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Container
from dataclasses import dataclass

from cryptography import x509

from meshca.spiffe import InvalidSpiffeId, SpiffeId


class SvidError(ValueError):
    """A certificate is not an acceptable X.509-SVID; `code` names the rule it breaks:
    `not_svid`, `not_leaf`, `revoked`, `foreign_trust_domain`, `identity_mismatch`,
    `not_valid_now`."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def serial_hex(cert: x509.Certificate) -> str:
    """The serial as lowercase hex of whole bytes (as the ledger, the bundle and
    `meshca certs` write it: a leading zero is kept)."""
    text = format(cert.serial_number, "x")
    return "0" + text if len(text) % 2 else text


def uri_sans(cert: x509.Certificate) -> list[str]:
    """All URI SANs of a certificate (an SVID has exactly one)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def dns_sans(cert: x509.Certificate) -> tuple[str, ...]:
    """All DNS SANs of a certificate."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(ext.value.get_values_for_type(x509.DNSName))


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE ID of an SVID; SvidError (`not_svid`) otherwise."""
    uris = uri_sans(cert)
    if not uris and not _has_san(cert):
        raise SvidError("not_svid", "certificate has no subjectAltName")
    if len(uris) != 1:
        raise SvidError(
            "not_svid", f"certificate has {len(uris)} URI SANs, an SVID has exactly one"
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as e:
        raise SvidError("not_svid", f"certificate URI SAN is not a SPIFFE ID: {e}") from None


def _has_san(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    return True


def is_ca(cert: x509.Certificate) -> bool:
    """True when basicConstraints says CA:TRUE."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def leaf_problem(cert: x509.Certificate) -> str | None:
    """Why `cert` cannot be a workload's leaf certificate, or None.

    The X.509-SVID spec (sections 4.1, 4.3) requires a leaf to be CA:FALSE and
    without keyCertSign or cRLSign. The TLS handshake does not check this: a
    CA:TRUE certificate signed by a trusted intermediate verifies as a leaf.
    """
    if is_ca(cert):
        return "certificate is a CA (basicConstraints CA:TRUE), not a workload leaf"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if usage.key_cert_sign or usage.crl_sign:
        return "certificate may sign certificates or CRLs (keyCertSign/cRLSign), not a leaf"
    return None


@dataclass(frozen=True, slots=True)
class SvidFacts:
    """What `verify_peer` reads off a certificate: fixed for a given certificate, so they
    may be kept and checked again against another revocation list or expectation."""

    sid: SpiffeId
    problem: str | None  # `leaf_problem`
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime


def svid_facts(cert: x509.Certificate) -> SvidFacts:
    """The facts `check_svid` needs; SvidError (`not_svid`) if it carries no single
    SPIFFE ID."""
    return SvidFacts(
        spiffe_id_of(cert),
        leaf_problem(cert),
        serial_hex(cert),
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


def verify_peer(
    cert: x509.Certificate,
    trust_domain: str,
    revoked: Container[str] = frozenset(),
    expect: SpiffeId | None = None,
    now: dt.datetime | None = None,
) -> SpiffeId:
    """The peer's SPIFFE ID, once its certificate (chain already verified by TLS) is an
    X.509-SVID leaf in `trust_domain`, not `revoked`, the one expected (if `expect`) and
    valid at `now` (if given); SvidError naming the first rule it breaks otherwise."""
    return check_svid(svid_facts(cert), trust_domain, revoked, expect, now)


def check_svid(
    facts: SvidFacts,
    trust_domain: str,
    revoked: Container[str] = frozenset(),
    expect: SpiffeId | None = None,
    now: dt.datetime | None = None,
) -> SpiffeId:
    """`verify_peer` on facts read before (the same rules, in the same order)."""
    sid = facts.sid
    if facts.problem is not None:
        raise SvidError("not_leaf", f"{sid}: {facts.problem}")
    serial = facts.serial
    if serial in revoked:
        raise SvidError("revoked", f"{sid}: certificate {serial} is revoked")
    if sid.trust_domain != trust_domain:
        raise SvidError("foreign_trust_domain", f"{sid} is not in trust domain {trust_domain}")
    if expect is not None and sid != expect:
        raise SvidError("identity_mismatch", f"presented {sid}, expected {expect}")
    if now is not None and not facts.not_before <= now < facts.not_after:
        raise SvidError("not_valid_now", f"{sid}: certificate is not valid now")
    return sid
