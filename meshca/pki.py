"""Pure certificate building and checking: roots, intermediates, X.509-SVID leaves, CSRs.

No I/O and no clock of its own: every function takes `now`. Every extension a
certificate carries is written out here explicitly, so the profile can be read
in one place (see docs/ca.md, "Certificate profile").
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshca.errors import BadRequest
from meshca.spiffe import SpiffeId
from meshca.svid import is_ca, serial_hex, spiffe_id_of, uri_sans

__all__ = ["is_ca", "serial_hex", "spiffe_id_of", "uri_sans"]  # X.509-SVID rules: meshca.svid

ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=365)
DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
BACKDATE = dt.timedelta(minutes=5)
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192  # bigger keys only cost the CA time; nobody needs them

CAPrivateKey = ec.EllipticCurvePrivateKey
LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM of a private key, unencrypted (protect the file with mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM of one certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _ski(public_key: object) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]


def _ca_name(kind: str, public_key: object) -> x509.Name:
    # A short piece of the key identifier keeps names unique across rotations,
    # so chain building never has to guess between two CAs of the same name.
    tag = _ski(public_key).digest.hex()[:8]
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshca"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshca {kind} {tag}"),
        ]
    )


def build_root(
    key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    lifetime: dt.timedelta = ROOT_LIFETIME,
) -> x509.Certificate:
    """A self-signed root CA certificate for `key`."""
    name = _ca_name("root", key.public_key())
    ski = _ski(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def build_intermediate(
    key: ec.EllipticCurvePrivateKey,
    root_cert: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    lifetime: dt.timedelta = INTERMEDIATE_LIFETIME,
) -> x509.Certificate:
    """An issuing CA (`pathlen:0`) for `key`, signed by the root; never outlives the root."""
    not_after = min(now + lifetime, root_cert.not_valid_after_utc)
    not_before = max(now - BACKDATE, root_cert.not_valid_before_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_ca_name("issuing", key.public_key()))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(_ski(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )


def build_endorsement(
    new_root: x509.Certificate,
    old_root: x509.Certificate,
    old_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> x509.Certificate:
    """A cross-certificate: the new root's name and key, signed by the old root.

    It is never served in a TLS chain (the old root's `pathlen:1` would not allow
    the extra step); it is published beside the bundle so that a client that still
    trusts only the old root can check that the new one comes from the same CA
    (see meshca.trust). Valid until the old root expires.
    """
    ski = new_root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(new_root.subject)
        .issuer_name(old_root.subject)
        .public_key(new_root.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - BACKDATE, old_root.not_valid_before_utc))
        .not_valid_after(min(new_root.not_valid_after_utc, old_root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(old_key.public_key()),
            critical=False,
        )
        .sign(old_key, hashes.SHA256())
    )


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_LEAF_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshca")])


def build_leaf(
    public_key: LeafPublicKey,
    spiffe_id: SpiffeId,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    ttl: dt.timedelta = DEFAULT_LEAF_TTL,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> x509.Certificate:
    """An X.509-SVID for `spiffe_id`: exactly one URI SAN, CA:FALSE, serverAuth + clientAuth.

    Validity starts BACKDATE before `now` (clock skew) and never leaves the issuer's.
    """
    if not spiffe_id.is_workload:
        raise ValueError("a leaf needs a workload SPIFFE ID, not a bare trust domain")
    not_before = max(now - BACKDATE, issuer_cert.not_valid_before_utc)
    not_after = min(now + ttl, issuer_cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError("the issuing CA has expired")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    return (
        x509.CertificateBuilder()
        .subject_name(_LEAF_SUBJECT)
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(_LEAF_EKU, critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def check_key_type(public_key: object) -> LeafPublicKey:
    """Accept EC P-256/P-384, Ed25519 and RSA 2048..8192 bits; raise BadRequest otherwise."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            return public_key
        raise BadRequest(
            f"EC curve {public_key.curve.name} is not accepted (use P-256 or P-384)",
            code="bad_key_type",
        )
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if bits < MIN_RSA_BITS:
            raise BadRequest(
                f"RSA key of {bits} bits is too small (at least {MIN_RSA_BITS})",
                code="bad_key_type",
            )
        if bits > MAX_RSA_BITS:
            raise BadRequest(
                f"RSA key of {bits} bits is too large (at most {MAX_RSA_BITS})",
                code="bad_key_type",
            )
        return public_key
    kind = type(public_key).__name__.lstrip("_").removesuffix("PublicKey") or "unknown"
    raise BadRequest(
        f"key type {kind} is not accepted (use EC P-256/P-384, Ed25519 or RSA >= 2048)",
        code="bad_key_type",
    )


def check_csr(pem: str | bytes) -> LeafPublicKey:
    """Parse a PEM CSR, check its key type and self-signature, return only its public key.

    Nothing else from the CSR (subject, SANs, extensions) is ever used.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise BadRequest("csr is not a PEM certificate request", code="bad_csr")
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm):
        raise BadRequest("csr could not be parsed", code="bad_csr") from None
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise BadRequest("csr public key could not be parsed", code="bad_key_type") from None
    key = check_key_type(public_key)
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise BadRequest("csr signature does not verify", code="bad_csr_signature")
    return key


def describe(cert: x509.Certificate) -> dict[str, str]:
    """The fields `meshca status` shows for a CA certificate."""
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": serial_hex(cert),
        "not_before": rfc3339(cert.not_valid_before_utc),
        "not_after": rfc3339(cert.not_valid_after_utc),
        "sha256": fingerprint(cert),
    }


def rfc3339(t: dt.datetime) -> str:
    """UTC time as RFC 3339 with a `Z`, second precision."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pem_join(certs: Iterable[x509.Certificate]) -> str:
    """Concatenated PEM text of several certificates."""
    return "".join(cert_pem(c).decode() for c in certs)
