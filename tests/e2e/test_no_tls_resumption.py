"""Neither the sidecar's inbound port nor the CA resumes a TLS session (tickets or session
IDs, TLS 1.2 and 1.3): a resumed session skips chain verification, so a peer whose root was
retired could come back on a session from before. A client that offers its previous
session gets a full handshake, and the request still succeeds."""

from __future__ import annotations

import socket
import ssl

import pytest
from helpers import curl_enroll, mint_token, openssl_csr


@pytest.fixture(scope="module")
def client(mesh, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    key, csr = openssl_csr(tmp, "client")
    sid = "spiffe://cluster.local/ns/a/sa/c"
    status, doc = curl_enroll(mesh.ca, csr, mint_token(mesh.ca.home, sid))
    assert status == 200
    chain = tmp / "client.pem"
    chain.write_text(doc["certificate_chain"])
    return chain, key


def get(target: str, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None):
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host, session=session) as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return tls.session, tls.session_reused, data


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("where", ["inbound", "ca"])
def test_sessions_are_never_resumed(mesh, client, version, where):
    chain, key = client
    target = mesh.inbound if where == "inbound" else mesh.ca.url.removeprefix("https://")
    ctx = ssl.create_default_context(cafile=str(mesh.ca.bundle))
    ctx.check_hostname = False
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_cert_chain(str(chain), str(key))
    session, reused, first = get(target, ctx)
    assert first.startswith(b"HTTP/1.1 ") and not reused
    for _ in range(2):
        _, reused, again = get(target, ctx, session)
        assert not reused
        assert again.split(b"\r\n", 1)[0] == first.split(b"\r\n", 1)[0]
