"""Trust bundles, shared by the CA and its clients: check roots, read the bundle document,
follow endorsements from an old root to a new one.

A bundle is a set of self-signed root certificates. When the CA rotates its root
it publishes, beside the bundle, an *endorsement* of the new root: a
cross-certificate with the new root's name and key, signed by the old root. A
client that still trusts only an old root (a bootstrap bundle written before
the rotation) accepts a new root only when a chain of endorsements leads to it
from a root it already trusts, so the bundle document is self-authenticating
and may be fetched before the client can verify the CA's TLS certificate.

Pure: no I/O, the time is passed in.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

MAX_BUNDLE_BYTES = 1 << 20
MAX_ROOTS = 16  # a bundle holds two roots during a rotation; more is a mistake or an attack
MAX_ENDORSEMENTS = 16  # each costs signature checks, before anything is trusted


class BundleError(ValueError):
    """A bundle or bundle document is unusable; the message says which and why."""


def _key_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate, min_path_length: int = 0) -> bool:
    """CA:TRUE with keyCertSign, and a pathLenConstraint that allows `min_path_length` CAs
    below (an issuing intermediate has pathlen 0: it can never endorse a root)."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    room = bc.path_length is None or bc.path_length >= min_path_length
    return bc.ca and ku.key_cert_sign and room


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _pem_certs(pem: str, where: str) -> list[x509.Certificate]:
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise BundleError(f"{where} holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise BundleError(f"{where} is not valid PEM certificates") from None


def load_roots(
    pem: str, now: dt.datetime, where: str = "the bundle"
) -> tuple[x509.Certificate, ...]:
    """The roots of a PEM bundle, checked: each a self-signed CA, at least one valid now.

    BundleError naming the problem otherwise (an expired root among valid ones is
    kept: it verifies nothing, and the CA retires it in its own time).
    """
    certs = _pem_certs(pem, where)
    if len(certs) > MAX_ROOTS:
        raise BundleError(f"{where} holds {len(certs)} certificates, more than {MAX_ROOTS}")
    for i, cert in enumerate(certs, 1):
        name = cert.subject.rfc4514_string() or f"certificate {i}"
        if not _is_ca(cert):
            raise BundleError(f"{where}: {name} is not a CA certificate (CA:TRUE, keyCertSign)")
        if cert.subject != cert.issuer or not _signed_by(cert, cert):
            raise BundleError(f"{where}: {name} is not a self-signed root")
    if not any(_valid_at(c, now) for c in certs):
        raise BundleError(f"{where}: every root in it has expired or is not valid yet")
    return tuple(certs)


def fingerprints(roots: Iterable[x509.Certificate]) -> list[str]:
    """SHA-256 fingerprints (hex) of `roots`, in order."""
    return [c.fingerprint(hashes.SHA256()).hex() for c in roots]


def endorsed_roots(
    trusted: Sequence[x509.Certificate],
    offered: Sequence[x509.Certificate],
    endorsements: Sequence[x509.Certificate],
    now: dt.datetime,
) -> tuple[x509.Certificate, ...]:
    """`offered` if every root in it is trusted already or endorsed from a trusted root.

    An endorsement counts when it is a CA certificate that may have CAs below it
    (pathlen >= 1, as a root: an issuing intermediate cannot endorse), valid at
    `now`, signed by a root already accepted, and carries exactly the offered
    root's name and key.
    Accepted roots can endorse further ones (root 1 -> root 2 -> root 3), so a
    bootstrap bundle from two rotations ago still leads to today's root.
    BundleError naming the first root that no chain reaches.
    """
    # Signers: the trusted roots, then every endorsement one of them signed (it stands
    # for the endorsed root's name and key), until nothing new is reached.
    signers = list(trusted)
    usable = [e for e in endorsements[:MAX_ENDORSEMENTS] if _is_ca(e, 1) and _valid_at(e, now)]
    progress = True
    while progress:
        progress = False
        for e in list(usable):
            if any(_signed_by(e, s) for s in signers):
                signers.append(e)
                usable.remove(e)
                progress = True
    reached = {(c.subject, _key_der(c)) for c in signers}
    for root in offered:
        if (root.subject, _key_der(root)) not in reached:
            name = root.subject.rfc4514_string()
            raise BundleError(f"the CA offers root {name}, which no root we trust endorses")
    return tuple(offered)


@dataclass(frozen=True)
class BundleDoc:
    """What `GET /v1/bundle` answers, parsed and checked."""

    trust_domain: str
    roots: tuple[x509.Certificate, ...] = field(repr=False)
    roots_pem: str = field(repr=False)
    sequence: int
    revoked: frozenset[str]
    endorsements: tuple[x509.Certificate, ...] = field(repr=False, default=())

    @classmethod
    def parse(cls, raw: bytes, now: dt.datetime, trust_domain: str | None = None) -> BundleDoc:
        """Parse the JSON document; BundleError naming the field that is wrong."""
        if len(raw) > MAX_BUNDLE_BYTES:
            raise BundleError(f"the bundle document is over {MAX_BUNDLE_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BundleError("the bundle document is not JSON") from None
        if not isinstance(doc, dict):
            raise BundleError("the bundle document is not a JSON object")
        td, roots_pem = doc.get("trust_domain"), doc.get("roots")
        seq, revoked = doc.get("sequence"), doc.get("revoked", [])
        endorsements = doc.get("endorsements", "")
        if not isinstance(td, str) or not td:
            raise BundleError("the bundle document lacks 'trust_domain'")
        if trust_domain is not None and td != trust_domain:
            raise BundleError(f"the bundle is for trust domain {td!r}, not {trust_domain!r}")
        if not isinstance(roots_pem, str):
            raise BundleError("the bundle document lacks 'roots' (PEM)")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise BundleError("the bundle document's 'sequence' is not a non-negative integer")
        if not isinstance(revoked, list) or not all(isinstance(s, str) for s in revoked):
            raise BundleError("the bundle document's 'revoked' is not a list of serials")
        if not isinstance(endorsements, str):
            raise BundleError("the bundle document's 'endorsements' is not PEM text")
        roots = load_roots(roots_pem, now, "the bundle's roots")
        ends = tuple(_pem_certs(endorsements, "'endorsements'")) if endorsements.strip() else ()
        if len(ends) > MAX_ENDORSEMENTS:
            raise BundleError(f"'endorsements' holds more than {MAX_ENDORSEMENTS} certificates")
        return cls(
            trust_domain=td,
            roots=roots,
            roots_pem=roots_pem,
            sequence=seq,
            revoked=frozenset(s.lower() for s in revoked),
            endorsements=ends,
        )
