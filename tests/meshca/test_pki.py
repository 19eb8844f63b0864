"""Certificate building and CSR checks: the SVID profile and the key types accepted."""

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshca import pki
from meshca.errors import BadRequest
from meshca.spiffe import SpiffeId

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
WEB = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")


@pytest.fixture(scope="module")
def chain():
    root_key = pki.new_key()
    root = pki.build_root(root_key, NOW)
    int_key = pki.new_key()
    inter = pki.build_intermediate(int_key, root, root_key, NOW)
    return root, inter, int_key


def csr_for(key, sign_hash=None):
    sign_hash = sign_hash or hashes.SHA256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else sign_hash
    return builder.sign(key, algo).public_bytes(serialization.Encoding.PEM)


def test_root_and_intermediate_profile(chain):
    root, inter, _ = chain
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ibc = inter.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ibc.critical and ibc.value.ca and ibc.value.path_length == 0
    assert root.not_valid_after_utc - NOW == pki.ROOT_LIFETIME
    assert inter.not_valid_after_utc - NOW == pki.INTERMEDIATE_LIFETIME
    inter.verify_directly_issued_by(root)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"


def test_leaf_profile(chain):
    _, inter, int_key = chain
    key = pki.new_key()
    leaf = pki.build_leaf(key.public_key(), WEB, inter, int_key, NOW)
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert pki.uri_sans(leaf) == [str(WEB)]
    assert pki.spiffe_id_of(leaf) == WEB
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.not_valid_before_utc == NOW - pki.BACKDATE
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=24)


def test_leaf_never_outlives_its_issuer(chain):
    _, inter, int_key = chain
    late = inter.not_valid_after_utc - dt.timedelta(hours=1)
    leaf = pki.build_leaf(pki.new_key().public_key(), WEB, inter, int_key, late)
    assert leaf.not_valid_after_utc == inter.not_valid_after_utc
    with pytest.raises(ValueError, match="expired"):
        pki.build_leaf(
            pki.new_key().public_key(),
            WEB,
            inter,
            int_key,
            inter.not_valid_after_utc + dt.timedelta(seconds=1),
        )


def test_leaf_needs_workload_id(chain):
    _, inter, int_key = chain
    with pytest.raises(ValueError):
        pki.build_leaf(
            pki.new_key().public_key(),
            SpiffeId.parse("spiffe://cluster.local"),
            inter,
            int_key,
            NOW,
        )


def test_serial_hex_is_whole_bytes(chain):
    root, _, _ = chain
    text = pki.serial_hex(root)
    assert len(text) % 2 == 0 and int(text, 16) == root.serial_number


ACCEPTED = {
    "P-256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "P-384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "Ed25519": ed25519.Ed25519PrivateKey.generate,
    "RSA-2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}

REFUSED = {
    "P-521": (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
    "secp256k1": (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
    "RSA-1024": (
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        "too small",
    ),
    "DSA-2048": (lambda: dsa.generate_private_key(2048), "DSA"),
    "Ed448": (ed448.Ed448PrivateKey.generate, "Ed448"),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_key_types(name):
    key = ACCEPTED[name]()
    got = pki.check_csr(csr_for(key))
    assert got.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("name", REFUSED)
def test_refused_key_types(name):
    make, why = REFUSED[name]
    with pytest.raises(BadRequest) as e:
        pki.check_csr(csr_for(make()))
    assert e.value.code == "bad_key_type" and why in e.value.detail


@pytest.mark.parametrize(
    "pem,code",
    [
        (b"", "bad_csr"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "bad_csr",
        ),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "bad_csr"),
    ],
)
def test_garbage_csr(pem, code):
    with pytest.raises(BadRequest) as e:
        pki.check_csr(pem)
    assert e.value.code == code


def test_csr_with_bad_signature():
    pem = csr_for(ec.generate_private_key(ec.SECP256R1()))
    csr = x509.load_pem_x509_csr(pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    i = der.find(b"\x0c\x01x")  # the CN "x" inside the signed part
    der[i + 2] = ord("y")
    import base64

    tampered = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(BadRequest) as e:
        pki.check_csr(tampered)
    assert e.value.code == "bad_csr_signature"
