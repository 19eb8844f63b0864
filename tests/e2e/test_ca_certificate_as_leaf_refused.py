"""A certificate that can sign certificates is never accepted as a workload's leaf.

Certificates signed by the mesh CA's own intermediate (so they chain to the
bundle and pass the TLS handshake) carry a valid SPIFFE ID but are CA:TRUE, or
CA:FALSE with keyCertSign or cRLSign, which the X.509-SVID spec forbids on a
leaf. Presented by a client on the inbound port (curl), the connection is
closed and the app sees nothing; presented by a server to the outbound side,
the call is 502 and the server receives no request; presented to the CA for an
mTLS renewal, 403. A proper leaf signed the same way is the control.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import threading

import pytest
from conftest import BACKEND, FRONTEND
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import curl_enroll, openssl_csr
from mesh import app_log, proxy_get, sidecar_config, start_sidecar

from meshca import pki
from meshca.authority import Authority

CALLER = "spiffe://cluster.local/ns/tools/sa/curl"

# name: (basicConstraints CA, keyCertSign, cRLSign)
SIGNERS = {
    "CA:TRUE": (True, True, True),
    "CA:TRUE without key usage bits": (True, False, False),
    "CA:FALSE with keyCertSign": (False, True, False),
    "CA:FALSE with cRLSign": (False, False, True),
}


def make(ca, tmp_path, name: str, spiffe_id: str, flags=(False, False, False)):
    """A certificate for `spiffe_id` signed by the CA's intermediate; (chain path, key path)."""
    is_ca, cert_sign, crl_sign = flags
    auth = Authority.load(ca.home)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshca")]))
        .issuer_name(auth.intermediate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
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
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(auth.intermediate_key.public_key()),
            critical=False,
        )
        .sign(auth.intermediate_key, hashes.SHA256())
    )
    chain, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    chain.write_text(auth.chain_pem(cert))
    key_path.write_bytes(pki.key_pem(key))
    return chain, key_path


def slug(case: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in case.lower())


def curl_inbound(mesh, chain, key, path):
    return subprocess.run(
        [
            "curl",
            "-sS",
            "-k",
            "--max-time",
            "10",
            "--cert",
            str(chain),
            "--key",
            str(key),
            f"https://{mesh.inbound}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("case", SIGNERS)
def test_inbound_refuses_a_client_certificate_that_can_sign(mesh, tmp_path, case):
    chain, key = make(mesh.ca, tmp_path, slug(case), CALLER, SIGNERS[case])
    before = len(app_log(mesh.app_log))
    res = curl_inbound(mesh, chain, key, "/ca-leaf")
    assert res.returncode != 0 and res.stdout == "", res.stdout
    assert len(app_log(mesh.app_log)) == before, "the app must see nothing"


def test_inbound_accepts_a_proper_leaf_signed_the_same_way(mesh, tmp_path):
    chain, key = make(mesh.ca, tmp_path, "leaf", CALLER)
    res = curl_inbound(mesh, chain, key, "/proper-leaf")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["path"] == "/proper-leaf"


class FakeSidecar:
    """A TLS server presenting `chain`; records whatever a client sends after the handshake."""

    def __init__(self, chain, key) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(chain), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(10)
                    while chunk := conn.recv(65536):
                        self.received += chunk
                        if b"\r\n\r\n" in chunk:
                            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def outbound(mesh, tmp_path_factory):
    """A frontend sidecar whose services are fake sidecars presenting each kind of certificate."""
    root = tmp_path_factory.mktemp("ca-leaf-outbound")
    servers = {"proper": FakeSidecar(*make(mesh.ca, root, "proper", BACKEND))}
    for case, flags in SIGNERS.items():
        servers[slug(case)] = FakeSidecar(*make(mesh.ca, root, slug(case), BACKEND, flags))
    services = {
        f"{name}.default": {"endpoints": [s.address], "identity": BACKEND}
        for name, s in servers.items()
    }
    sidecar = start_sidecar(sidecar_config(root, "caller", mesh.ca, FRONTEND, services=services))
    try:
        yield sidecar, servers
    finally:
        sidecar.stop()
        for s in servers.values():
            s.close()


@pytest.mark.parametrize("case", SIGNERS)
def test_outbound_refuses_a_server_certificate_that_can_sign(outbound, case):
    sidecar, servers = outbound
    status, body, _ = proxy_get(sidecar, f"http://{slug(case)}.default/secret")
    doc = json.loads(body)
    assert status == 502 and doc["error"] == "peer_verification_failed", doc
    assert "not a workload leaf" in doc["detail"] or "not a leaf" in doc["detail"], doc
    assert servers[slug(case)].received == b"", "nothing may be sent to such a server"


def test_outbound_calls_a_proper_leaf_signed_the_same_way(outbound):
    sidecar, servers = outbound
    status, body, _ = proxy_get(sidecar, "http://proper.default/hello")
    assert status == 200 and body == b"ok"
    assert b"GET /hello HTTP/1.1" in servers["proper"].received


@pytest.mark.parametrize("case", SIGNERS)
def test_ca_renewal_refuses_a_certificate_that_can_sign(mesh, tmp_path, case):
    chain, key = make(mesh.ca, tmp_path, slug(case), CALLER, SIGNERS[case])
    _, csr = openssl_csr(tmp_path, "renew")
    status, doc = curl_enroll(mesh.ca, csr, None, "--cert", str(chain), "--key", str(key))
    assert status == 403 and "not a workload SVID" in doc["detail"], doc


def test_ca_renewal_control_is_refused_for_another_reason(mesh, tmp_path):
    """A proper leaf that the CA never issued gets past the leaf check to the ledger's."""
    chain, key = make(mesh.ca, tmp_path, "unrecorded", CALLER)
    _, csr = openssl_csr(tmp_path, "renew")
    status, doc = curl_enroll(mesh.ca, csr, None, "--cert", str(chain), "--key", str(key))
    assert status == 403 and "not issued by this CA" in doc["detail"], doc
