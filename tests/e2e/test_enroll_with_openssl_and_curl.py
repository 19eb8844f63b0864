"""A pod enrolls with a join token using only `openssl req` and `curl`; the leaf is a strict SVID.

The issued leaf must pass `openssl verify -x509_strict` for client and server
use and cryptography's path validation, carry exactly one URI SAN, and ignore
everything the CSR asked for besides its public key.
"""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest
from cryptography import x509
from cryptography.x509 import verification as v
from helpers import curl_enroll, ledger_certs, mint_token, split_chain

WEB = "spiffe://cluster.local/ns/default/sa/web"


def openssl_verify(tmp_path, bundle, chain: list[str], purpose: str) -> subprocess.CompletedProcess:
    leaf, inter = tmp_path / "leaf.pem", tmp_path / "inter.pem"
    leaf.write_text(chain[0])
    inter.write_text(chain[1])
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            str(bundle),
            "-untrusted",
            str(inter),
            str(leaf),
        ],
        capture_output=True,
        text=True,
    )


KEY_TYPES = {
    "ec-p256": ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
    "ec-p384": ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"),
    "ed25519": ("-newkey", "ed25519"),
    "rsa-2048": ("-newkey", "rsa:2048"),
}


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_enroll_issues_strict_svid(tmp_path, ca, key_type):
    from helpers import openssl_csr

    key, csr = openssl_csr(tmp_path, key_type, *KEY_TYPES[key_type])
    token = mint_token(ca.home, WEB)
    status, doc = curl_enroll(ca, csr, token)
    assert status == 200, doc
    assert doc["spiffe_id"] == WEB
    chain = split_chain(doc["certificate_chain"])
    assert len(chain) == 2, "leaf then intermediate"
    assert doc["trust_bundle"] == ca.bundle.read_text()

    for purpose in ("sslclient", "sslserver"):
        res = openssl_verify(tmp_path, ca.bundle, chain, purpose)
        assert res.returncode == 0 and ": OK" in res.stdout, res.stdout + res.stderr

    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    inter = x509.load_pem_x509_certificate(chain[1].encode())
    roots = x509.load_pem_x509_certificates(ca.bundle.read_bytes())
    verifier = v.PolicyBuilder().store(v.Store(roots)).build_client_verifier()
    verified = verifier.verify(leaf, [inter])
    uris = [s for s in verified.subjects if isinstance(s, x509.UniformResourceIdentifier)]
    assert [u.value for u in uris] == [WEB]

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert format(leaf.serial_number, "x").lstrip("0") == doc["serial"].lstrip("0")

    # 24 h default lifetime, back-dated a few minutes for clock skew.
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=24) < lifetime <= dt.timedelta(hours=24, minutes=10)
    assert leaf.not_valid_before_utc < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    assert doc["expires_at"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    # The private key made by openssl matches the certificate: only the CSR's key was used.
    pub = subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-pubout"], capture_output=True, text=True, check=True
    ).stdout
    leaf_pub = subprocess.run(
        ["openssl", "x509", "-noout", "-pubkey"],
        input=chain[0],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert pub == leaf_pub

    rows = [r for r in ledger_certs(ca.home) if r["serial"] == doc["serial"]]
    assert len(rows) == 1 and rows[0]["spiffe_id"] == WEB and rows[0]["credential"] == "join_token"


def test_csr_requests_are_ignored(tmp_path, ca):
    """A CSR asking for another identity, extra names and CA:TRUE gets the token's SVID only."""
    from helpers import openssl_csr

    _, csr = openssl_csr(
        tmp_path,
        "greedy",
        extra=(
            "-addext",
            "subjectAltName=URI:spiffe://cluster.local/ns/kube-system/sa/admin,"
            "DNS:evil.example,IP:10.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ),
    )
    status, doc = curl_enroll(ca, csr, mint_token(ca.home, WEB))
    assert status == 200, doc
    leaf = x509.load_pem_x509_certificate(split_chain(doc["certificate_chain"])[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB)]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert not leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert leaf.subject.rfc4514_string() == "O=meshca"
