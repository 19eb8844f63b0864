"""TLS session resumption, as a repeat client sees it.

The sidecar's inbound port resumes a session (a TLS 1.3 ticket, a TLS 1.2 ticket or
session ID) only within the generation of credentials that made it: tickets are sealed
with keys of that generation's own context, so a new certificate or new roots start
every client over with a full handshake. A resumed session skips chain verification:
the certificate it carries is still checked for each connection (identity, revocation,
and its dates), and the app still sees who called. The CA never resumes a session (a
peer whose root was retired could otherwise come back on a session from before)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import ssl

import pytest
from conftest import FRONTEND
from helpers import curl_enroll, mint_token, openssl_csr
from mesh import admin_get, proxy_get

CLIENT_ID = "spiffe://cluster.local/ns/a/sa/c"


@pytest.fixture(scope="module")
def client(mesh, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    key, csr = openssl_csr(tmp, "client")
    status, doc = curl_enroll(mesh.ca, csr, mint_token(mesh.ca.home, CLIENT_ID))
    assert status == 200
    chain = tmp / "client.pem"
    chain.write_text(doc["certificate_chain"])
    return chain, key


def get(target: str, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None):
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host, session=session) as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            tls.settimeout(10)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return tls.session, tls.session_reused, data


VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


def client_context(mesh, client, version) -> ssl.SSLContext:
    chain, key = client
    ctx = ssl.create_default_context(cafile=str(mesh.ca.bundle))
    ctx.check_hostname = False
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_cert_chain(str(chain), str(key))
    return ctx


@pytest.mark.parametrize("version", VERSIONS)
def test_the_ca_never_resumes(mesh, client, version):
    target = mesh.ca.url.removeprefix("https://")
    ctx = client_context(mesh, client, version)
    session, reused, first = get(target, ctx)
    assert first.startswith(b"HTTP/1.1 ") and not reused
    for _ in range(2):
        _, reused, again = get(target, ctx, session)
        assert not reused
        assert again.split(b"\r\n", 1)[0] == first.split(b"\r\n", 1)[0]


def xfcc_uri(answer: bytes) -> str:
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    return seen["x-forwarded-client-cert"].rsplit(";URI=", 1)[1]


@pytest.mark.parametrize("version", VERSIONS)
def test_inbound_resumes_within_a_generation_only(mesh, client, version):
    ctx = client_context(mesh, client, version)
    session, reused, first = get(mesh.inbound, ctx)
    assert not reused and xfcc_uri(first) == CLIENT_ID
    for _ in range(2):
        session2, reused, again = get(mesh.inbound, ctx, session)
        assert reused, "the inbound did not resume the session it issued"
        assert xfcc_uri(again) == CLIENT_ID  # the app still sees who called
    # A new certificate for the sidecar: a new context, and the old sessions are gone.
    status, doc = admin_get(mesh.backend, "/rotate", method="POST")
    assert status == 200, doc
    _, reused, after = get(mesh.inbound, ctx, session2)
    assert not reused and xfcc_uri(after) == CLIENT_ID


def test_sidecar_to_sidecar_connections_resume(mesh):
    """The outbound keeps the session of a connection once it has served a request, and
    offers it when the pool opens the next: those handshakes are resumed at the inbound
    (its /status counts them), and every call still reaches the app as the frontend."""
    before = admin_get(mesh.backend, "/status")[1]["inbound_tls_sessions"]
    status, body, _ = proxy_get(mesh.frontend, "http://backend.default/first")
    assert status == 200, body
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # the pool must open more
        got = list(
            pool.map(
                lambda n: proxy_get(mesh.frontend, f"http://backend.default/c{n}?delay=0.5"),
                range(6),
            )
        )
    for status, body, _ in got:
        assert status == 200, body
        seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
        assert seen["x-forwarded-client-cert"].endswith(f";URI={FRONTEND}")
    after = admin_get(mesh.backend, "/status")[1]["inbound_tls_sessions"]
    assert after["resumed"] - before["resumed"] >= 4, (before, after)
