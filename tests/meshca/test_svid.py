"""X.509-SVID rules, one table for every party that checks a peer (sidecar inbound, outbound,
`sidecar check`, the CA's renewal path): each rule refused with its code."""

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from meshca import pki
from meshca.spiffe import SpiffeId
from meshca.svid import SvidError, serial_hex, verify_peer

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
WEB = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/web")


@pytest.fixture(scope="module")
def ca():
    rk = pki.new_key()
    root = pki.build_root(rk, NOW)
    ik = pki.new_key()
    return pki.build_intermediate(ik, root, rk, NOW), ik


def cert(ca, uris=(str(WEB),), is_ca=False, cert_sign=False, serial=None, days=1):
    inter, ik = ca
    key = pki.new_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(inter.subject)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, cert_sign, False, False, False),
            critical=True,
        )
    )
    if uris is not None:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return b.sign(ik, hashes.SHA256())


@pytest.mark.parametrize(
    "kw,check,code",
    [
        ({}, {}, None),
        ({"uris": None}, {}, "not_svid"),
        ({"uris": ()}, {}, "not_svid"),
        ({"uris": (str(WEB), "spiffe://cluster.local/ns/a/sa/x")}, {}, "not_svid"),
        ({"uris": ("https://example.com/x",)}, {}, "not_svid"),
        ({"is_ca": True}, {}, "not_leaf"),
        ({"cert_sign": True}, {}, "not_leaf"),
        ({}, {"trust_domain": "other.domain"}, "foreign_trust_domain"),
        ({}, {"expect": SpiffeId.parse("spiffe://cluster.local/ns/a/sa/db")}, "identity_mismatch"),
        ({}, {"now": NOW + dt.timedelta(days=2)}, "not_valid_now"),
    ],
)
def test_verify_peer(ca, kw, check, code):
    c = cert(ca, **kw)
    args = {"trust_domain": "cluster.local", **check}
    if code is None:
        assert verify_peer(c, **args) == WEB
    else:
        with pytest.raises(SvidError) as e:
            verify_peer(c, **args)
        assert e.value.code == code


def test_revoked_serial(ca):
    c = cert(ca)
    with pytest.raises(SvidError) as e:
        verify_peer(c, "cluster.local", revoked={serial_hex(c)})
    assert e.value.code == "revoked" and serial_hex(c) in e.value.detail


@pytest.mark.parametrize("serial,text", [(0xABC, "0abc"), (0x1ABC, "1abc"), (0x0F, "0f")])
def test_serials_are_whole_bytes(ca, serial, text):
    """`sidecar check`, the ledger and the bundle write serials alike (a leading 0 kept)."""
    assert serial_hex(cert(ca, serial=serial)) == text
