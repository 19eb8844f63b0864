"""The CA's mTLS renewal refuses a peer certificate that is not a workload leaf.

`Enroller.check_peer_svid` is given a ledger that would accept any serial, so
only the certificate's own extensions can refuse it: CA:TRUE, or CA:FALSE with
keyCertSign or cRLSign (X.509-SVID 4.1, 4.3), is Forbidden; a proper leaf is not.
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca.enroll import Enroller
from meshca.errors import Forbidden

NOW = dt.datetime.now(dt.UTC)
ID = "spiffe://cluster.local/ns/default/sa/web"


class AnyLedger:
    """Says every serial was issued and never revoked."""

    def certificate(self, serial):
        return SimpleNamespace(revoked_at=None)

    def ban_of(self, spiffe_id):
        return None


def enroller() -> Enroller:
    return Enroller(SimpleNamespace(trust_domain="cluster.local"), AnyLedger(), None, None, None)


def leaf(ca: bool, cert_sign: bool = False, crl_sign: bool = False) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshca")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=1))
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ID)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def test_a_workload_leaf_passes():
    sid, dns = enroller().check_peer_svid(leaf(ca=False), NOW)
    assert str(sid) == ID and dns == ()


@pytest.mark.parametrize(
    "kw",
    [
        {"ca": True, "cert_sign": True, "crl_sign": True},
        {"ca": True},
        {"ca": False, "cert_sign": True},
        {"ca": False, "crl_sign": True},
    ],
)
def test_a_certificate_that_can_sign_is_refused(kw):
    with pytest.raises(Forbidden, match="not a workload SVID"):
        enroller().check_peer_svid(leaf(**kw), NOW)
