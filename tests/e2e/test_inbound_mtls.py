"""Calling the inbound port directly: a CA-issued client certificate gets through (curl, openssl);
no certificate, a foreign CA's, an expired one, another trust domain's, or plaintext HTTP get
nothing to the app."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess

import pytest
from conftest import BACKEND
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import curl_enroll, mint_token, openssl_csr, run_meshca, start_ca
from mesh import app_log

from meshca import pki
from meshca.authority import Authority
from meshca.spiffe import SpiffeId

CALLER = "spiffe://cluster.local/ns/tools/sa/curl"


def enroll(ca, tmp_path, spiffe_id=CALLER, name="caller"):
    key, csr = openssl_csr(tmp_path, name)
    status, doc = curl_enroll(ca, csr, mint_token(ca.home, spiffe_id))
    assert status == 200, doc
    chain = tmp_path / f"{name}-chain.pem"
    chain.write_text(doc["certificate_chain"])
    return chain, key


def forge(ca, tmp_path, name, spiffe_id, now, ttl):
    """A leaf signed directly with the mesh CA's intermediate (chains to the bundle)."""
    auth = Authority.load(ca.home)
    key = pki.new_key()
    leaf = pki.build_leaf(
        key.public_key(),
        SpiffeId.parse(spiffe_id),
        auth.intermediate,
        auth.intermediate_key,
        now,
        ttl,
    )
    chain, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    chain.write_text(auth.chain_pem(leaf))
    key_path.write_bytes(pki.key_pem(key))
    return chain, key_path


def curl_inbound(mesh, path, *args):
    return subprocess.run(
        ["curl", "-sS", "-k", "--max-time", "10", *args, f"https://{mesh.inbound}{path}"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_curl_with_client_certificate(mesh, tmp_path):
    """curl --cert/--key/--cacert, checking the sidecar by the DNS SAN its join token granted."""
    chain, key = enroll(mesh.ca, tmp_path)
    port = mesh.inbound.rsplit(":", 1)[1]
    res = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(mesh.ca.bundle),
            "--cert",
            str(chain),
            "--key",
            str(key),
            "--resolve",
            f"backend.default.svc:{port}:127.0.0.1",
            f"https://backend.default.svc:{port}/direct",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    h = {k.lower(): v for k, v in json.loads(res.stdout)["headers"].items()}
    leaf = x509.load_pem_x509_certificate(chain.read_bytes())
    digest = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert h["x-forwarded-client-cert"] == f"By={BACKEND};Hash={digest};URI={CALLER}"


def test_openssl_s_client_verifies_the_sidecar(mesh, tmp_path):
    chain, key = enroll(mesh.ca, tmp_path)
    res = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            mesh.inbound,
            "-cert",
            str(chain),
            "-key",
            str(key),
            "-cert_chain",  # -cert sends only the leaf; the server needs the intermediate too
            str(chain),
            "-CAfile",
            str(mesh.ca.bundle),
            "-verify_return_error",
            "-ign_eof",
        ],
        input="GET /s_client HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Verify return code: 0 (ok)" in res.stdout, res.stdout + res.stderr
    assert "HTTP/1.1 200" in res.stdout and '"/s_client"' in res.stdout
    server_pem = res.stdout.split("Server certificate\n", 1)[1]
    server_pem = server_pem[: server_pem.index("-----END CERTIFICATE-----") + 25]
    server = x509.load_pem_x509_certificate(server_pem.encode())
    assert pki.uri_sans(server) == [BACKEND]


def foreign_ca_cert(mesh, tmp_path):
    other = tmp_path / "other-ca"
    run_meshca("init", "--home", str(other))
    proc = start_ca(other)
    try:
        return enroll(proc, tmp_path, name="foreign")
    finally:
        proc.stop()


def expired_cert(mesh, tmp_path):
    # Valid from the intermediate's own start until 30 seconds ago.
    now = dt.datetime.now(dt.UTC)
    return forge(
        mesh.ca,
        tmp_path,
        "expired",
        CALLER,
        now - dt.timedelta(minutes=4),
        dt.timedelta(minutes=3, seconds=30),
    )


def other_trust_domain(mesh, tmp_path):
    return forge(
        mesh.ca,
        tmp_path,
        "othertd",
        "spiffe://evil.org/ns/default/sa/x",
        dt.datetime.now(dt.UTC),
        dt.timedelta(hours=1),
    )


REFUSED = {
    "no client certificate": None,
    "foreign CA": foreign_ca_cert,
    "expired certificate": expired_cert,
    "another trust domain": other_trust_domain,
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_peers_reach_nothing(mesh, tmp_path, case):
    make = REFUSED[case]
    args = []
    if make is not None:
        chain, key = make(mesh, tmp_path)
        args = ["--cert", str(chain), "--key", str(key)]
    before = len(app_log(mesh.app_log))
    res = curl_inbound(mesh, "/refused", *args)
    assert res.returncode != 0, res.stdout  # handshake failure or connection closed
    assert res.stdout == ""
    assert len(app_log(mesh.app_log)) == before, "the app must see nothing"


def test_plaintext_http_is_refused(mesh):
    before = len(app_log(mesh.app_log))
    res = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"http://{mesh.inbound}/plain"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0 and res.stdout == ""
    assert len(app_log(mesh.app_log)) == before
    # and the sidecar keeps serving
    from mesh import proxy_get

    assert proxy_get(mesh.frontend, "http://backend.default/after")[0] == 200
