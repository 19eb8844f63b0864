"""Legacy TLS (1.0 and 1.1) on the CA's port and on the sidecar's inbound port is answered
with a fatal `protocol_version` alert (RFC 8996), so an old client says why it failed
instead of "unexpected EOF"; TLS 1.2 and TLS 1.3 clients are served as before."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import warnings

import pytest
from helpers import mint_token

from meshca.client import EnrollmentClient, new_key_and_csr, private_key_pem

CLIENT = "spiffe://cluster.local/ns/default/sa/oldclient"


def target(mesh, port: str) -> str:
    if port == "ca":
        host, p = mesh.ca.host_port
        return f"{host}:{p}"
    return mesh.inbound


def s_client(hostport: str, *args: str) -> str:
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", hostport, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def client_pem(mesh, tmp_path_factory):
    """A workload certificate and key (one PEM file) for the inbound port's mTLS."""
    key, csr = new_key_and_csr()
    got = asyncio.run(
        EnrollmentClient(mesh.ca.url, mesh.ca.bundle.read_text()).enroll(
            csr, mint_token(mesh.ca.home, CLIENT)
        )
    )
    path = tmp_path_factory.mktemp("client") / "client.pem"
    path.write_bytes(got.chain_pem.encode() + private_key_pem(key))
    return path


@pytest.fixture(scope="module")
def legacy_openssl():
    out = s_client("127.0.0.1:9", "-tls1", "-cipher", "DEFAULT@SECLEVEL=0")
    if "unknown option" in out.lower() or "no protocols available" in out.lower():
        pytest.skip("this openssl cannot speak TLS 1.0 at all")


@pytest.mark.parametrize("version,name", [("-tls1", "1.0"), ("-tls1_1", "1.1")])
@pytest.mark.parametrize("port", ["ca", "inbound"])
def test_openssl_legacy_client_is_told_protocol_version(mesh, legacy_openssl, port, version, name):
    out = s_client(target(mesh, port), version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert "alert protocol version" in out, out
    assert "unexpected eof" not in out.lower(), out
    log = mesh.ca.log if port == "ca" else mesh.backend.stderr
    assert f"refused a TLS {name} ClientHello" in log


@pytest.mark.parametrize("port", ["ca", "inbound"])
def test_python_legacy_client_is_told_protocol_version(mesh, port):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    try:
        with warnings.catch_warnings():  # deprecated versions: exactly what is tested
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this Python's OpenSSL cannot offer TLS 1.1")
    host, p = target(mesh, port).rsplit(":", 1)
    with socket.create_connection((host, int(p)), timeout=10) as raw:
        with pytest.raises(ssl.SSLError) as e:
            ctx.wrap_socket(raw)
    assert "PROTOCOL_VERSION" in str(e.value).upper(), e.value


@pytest.mark.parametrize("port", ["ca", "inbound"])
def test_the_alert_on_the_wire(mesh, port):
    """A TLS 1.0 ClientHello's first bytes get exactly one fatal protocol_version record."""
    hello = bytes.fromhex("16030100310100002d0301") + b"\x00" * 32 + bytes.fromhex("00000200ff0100")
    host, p = target(mesh, port).rsplit(":", 1)
    with socket.create_connection((host, int(p)), timeout=10) as s:
        s.sendall(hello)
        got = b""
        while chunk := s.recv(100):
            got += chunk
    assert got == b"\x15\x03\x01\x00\x02\x02\x46"


@pytest.mark.parametrize("tls", [("--tlsv1.2", "--tls-max", "1.2"), ("--tlsv1.3",)])
def test_tls12_and_tls13_clients_are_served(mesh, client_pem, tls):
    host, port = mesh.ca.host_port
    ca = subprocess.run(
        ["curl", "-sS", "--max-time", "20", *tls, "--cacert", str(mesh.ca.bundle)]
        + ["-o", "/dev/null", "-w", "%{http_code} %{ssl_verify_result}"]
        + [f"https://{host}:{port}/healthz"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ca.stdout == "200 0", ca.stderr
    ip, inbound_port = mesh.inbound.rsplit(":", 1)
    inbound = subprocess.run(
        ["curl", "-sS", "--max-time", "20", *tls, "--cacert", str(mesh.ca.bundle)]
        + ["--cert", str(client_pem), "--key", str(client_pem)]
        + ["--resolve", f"backend.default.svc:{inbound_port}:{ip}"]
        + ["-o", "/dev/null", "-w", "%{http_code}"]
        + [f"https://backend.default.svc:{inbound_port}/modern"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert inbound.stdout == "200", inbound.stderr


@pytest.mark.parametrize("version,proto", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
@pytest.mark.parametrize("port", ["ca", "inbound"])
def test_openssl_modern_handshake(mesh, client_pem, port, version, proto):
    cert = ["-cert", str(client_pem), "-key", str(client_pem)] if port == "inbound" else []
    out = s_client(target(mesh, port), version, "-CAfile", str(mesh.ca.bundle), *cert)
    assert f"Protocol  : {proto}" in out or f"New, {proto}" in out, out
    assert "Verify return code: 0 (ok)" in out, out
