"""A workload renews with no token by presenting its current certificate over mTLS.

It gets a new certificate for the same SPIFFE ID under a new key; a certificate
from another CA, an expired one, or one this CA's ledger never issued gets nothing.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import (
    curl_enroll,
    mint_token,
    openssl_csr,
    py_post,
    request_json,
    run_meshca,
    split_chain,
    start_ca,
    workload_certs,
)

from meshca import pki
from meshca.authority import Authority
from meshca.spiffe import SpiffeId

WEB = "spiffe://cluster.local/ns/default/sa/web"


def enroll(tmp_path, ca, name="first"):
    key, csr = openssl_csr(tmp_path, name)
    status, doc = curl_enroll(ca, csr, mint_token(ca.home, WEB))
    assert status == 200, doc
    chain = tmp_path / f"{name}-chain.pem"
    chain.write_text(doc["certificate_chain"])
    return key, chain, doc


def test_renew_with_curl_client_certificate(tmp_path, ca):
    key, chain, first = enroll(tmp_path, ca)
    _, csr = openssl_csr(tmp_path, "renewed")
    status, doc = curl_enroll(ca, csr, None, "--cert", str(chain), "--key", str(key))
    assert status == 200, doc
    assert doc["spiffe_id"] == WEB and doc["serial"] != first["serial"]
    rows = {r["serial"]: r for r in workload_certs(ca.home)}
    assert rows[doc["serial"]]["credential"] == "renewal"
    new_leaf = x509.load_pem_x509_certificate(split_chain(doc["certificate_chain"])[0].encode())
    old_leaf = x509.load_pem_x509_certificate(chain.read_bytes())
    assert new_leaf.public_key() != old_leaf.public_key()


def test_renew_with_python_client(tmp_path, ca):
    key, chain, first = enroll(tmp_path, ca)
    _, csr = openssl_csr(tmp_path, "py")
    status, doc, _ = py_post(
        ca, "/v1/certificates", request_json(csr.read_text()).encode(), cert=(chain, key)
    )
    assert status == 200 and doc["spiffe_id"] == WEB


def curl_rc(ca, csr, *args):
    body = csr.parent / "renew.json"
    body.write_text(request_json(csr.read_text()))
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(ca.bundle),
            "--data-binary",
            f"@{body}",
            *args,
            ca.url + "/v1/certificates",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_certificate_from_another_ca_fails_the_handshake(tmp_path, ca):
    other = tmp_path / "other"
    run_meshca("init", "--home", str(other))
    proc = start_ca(other)
    try:
        key, chain, _ = enroll(tmp_path, proc, "foreign")
    finally:
        proc.stop()
    _, csr = openssl_csr(tmp_path, "x")
    res = curl_rc(ca, csr, "--cert", str(chain), "--key", str(key))
    assert res.returncode != 0, res.stdout  # TLS alert: unknown CA
    assert workload_certs(ca.home) == []


def test_expired_certificate_cannot_renew(tmp_path, ca_home):
    ca = start_ca(ca_home, "--cert-ttl", "2")
    try:
        key, chain, _ = enroll(tmp_path, ca)
        time.sleep(3)
        _, csr = openssl_csr(tmp_path, "late")
        res = curl_rc(ca, csr, "--cert", str(chain), "--key", str(key))
        assert res.returncode != 0, res.stdout  # TLS alert: certificate expired
        assert len(workload_certs(ca.home)) == 1
    finally:
        ca.stop()


def test_certificate_missing_from_ledger_is_forbidden(tmp_path, ca):
    """Signed by the CA's key but never recorded (a forged or lost issuance): 403."""
    authority = Authority.load(ca.home)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = authority.issue(
        key.public_key(), SpiffeId.parse(WEB), dt.datetime.now(dt.UTC), dt.timedelta(hours=1)
    )
    chain, key_path = tmp_path / "forged.pem", tmp_path / "forged.key"
    chain.write_text(authority.chain_pem(leaf))
    key_path.write_bytes(pki.key_pem(key))
    _, csr = openssl_csr(tmp_path, "f")
    status, doc = curl_enroll(ca, csr, None, "--cert", str(chain), "--key", str(key_path))
    assert status == 403 and doc["error"] == "forbidden"
    assert "not issued by this CA" in doc["detail"]
    assert workload_certs(ca.home) == []
