"""`leaf_problem`: a peer's certificate must be a leaf (X.509-SVID 4.1, 4.3), table-tested."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.identity.creds import leaf_problem

NOW = dt.datetime.now(dt.UTC)


def usage(sign: bool = True, cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def cert(ca: bool | None, ku: x509.KeyUsage | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "t")])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")]
            ),
            critical=False,
        )
    )
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if ku is not None:
        b = b.add_extension(ku, critical=True)
    return b.sign(key, hashes.SHA256())


@pytest.mark.parametrize(
    "ca,ku,why",
    [
        (False, usage(), None),
        (None, usage(), None),  # no basicConstraints: not a CA
        (False, None, None),
        (None, None, None),
        (True, usage(cert_sign=True, crl_sign=True), "is a CA"),
        (True, usage(), "is a CA"),
        (True, None, "is a CA"),
        (False, usage(cert_sign=True), "keyCertSign/cRLSign"),
        (False, usage(crl_sign=True), "keyCertSign/cRLSign"),
        (None, usage(cert_sign=True), "keyCertSign/cRLSign"),
    ],
)
def test_leaf_problem(ca, ku, why):
    problem = leaf_problem(cert(ca, ku))
    if why is None:
        assert problem is None
    else:
        assert problem is not None and why in problem
