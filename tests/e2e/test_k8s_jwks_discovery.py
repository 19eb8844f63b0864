"""SA token keys found by OIDC discovery from the issuer URL, as the API server serves them.

A stand-in API server (HTTPS, certificate from trustme) serves
`/.well-known/openid-configuration` and the JWKS behind a bearer token. The CA
discovers the keys, picks up a rotated signing key on an unknown `kid`, and
keeps working on its cached keys while the API server is down.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa
from helpers import curl_enroll, openssl_csr, start_ca

API_TOKEN = "api-reader-token-123"


class FakeAPIServer:
    def __init__(self, tmp_path):
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.hits: list[tuple[str, str | None]] = []
        ca = trustme.CA()
        self.ca_file = tmp_path / "apiserver-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(ctx)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append((self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Bearer {API_TOKEN}":
                    return self._send(401, {"message": "Unauthorized"})
                if self.path == "/.well-known/openid-configuration":
                    return self._send(
                        200, {"issuer": outer.issuer, "jwks_uri": outer.issuer + "/openid/v1/jwks"}
                    )
                if self.path == "/openid/v1/jwks":
                    keys = []
                    for kid, key in outer.keys.items():
                        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
                        jwk.update(kid=kid, alg="RS256", use="sig")
                        keys.append(jwk)
                    return self._send(200, {"keys": keys})
                return self._send(404, {})

            def _send(self, status, doc):
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.issuer = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def token(self, kid, namespace="shop", account="orders"):
        now = int(time.time())
        return jwt.encode(
            {
                "iss": self.issuer,
                "aud": ["meshca"],
                "iat": now,
                "exp": now + 600,
                "sub": f"system:serviceaccount:{namespace}:{account}",
                "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": account}},
            },
            self.keys[kid],
            algorithm="RS256",
            headers={"kid": kid},
        )

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def apiserver(tmp_path):
    server = FakeAPIServer(tmp_path)
    server.keys["k1"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        yield server
    finally:
        server.stop()


def test_discovery_rotation_and_outage(tmp_path, ca_home, apiserver):
    token_file = tmp_path / "reader-token"
    token_file.write_text(API_TOKEN + "\n")
    ca = start_ca(
        ca_home,
        "--k8s-issuer",
        apiserver.issuer,
        "--k8s-ca-file",
        str(apiserver.ca_file),
        "--k8s-token-file",
        str(token_file),
        "--k8s-jwks-min-interval",
        "0.2",
    )
    try:
        _, csr = openssl_csr(tmp_path, "a")
        status, doc = curl_enroll(ca, csr, apiserver.token("k1"))
        assert status == 200, doc
        assert doc["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/orders"
        assert [p for p, _ in apiserver.hits] == [
            "/.well-known/openid-configuration",
            "/openid/v1/jwks",
        ]
        assert all(auth == f"Bearer {API_TOKEN}" for _, auth in apiserver.hits)

        # The API server rotates its signing key: an unknown kid triggers a refetch.
        apiserver.keys["k2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        time.sleep(0.3)
        _, csr = openssl_csr(tmp_path, "b")
        status, doc = curl_enroll(ca, csr, apiserver.token("k2", account="payments"))
        assert status == 200, doc
        assert doc["spiffe_id"].endswith("/ns/shop/sa/payments")

        # The API server goes away: cached keys keep working; unknown keys are refused.
        apiserver.stop()
        _, csr = openssl_csr(tmp_path, "c")
        assert curl_enroll(ca, csr, apiserver.token("k1"))[0] == 200
        apiserver.keys["k3"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        time.sleep(0.3)
        _, csr = openssl_csr(tmp_path, "d")
        status, doc = curl_enroll(ca, csr, apiserver.token("k3"))
        assert status == 401 and "not in the cluster's JWKS" in doc["detail"]
        assert API_TOKEN not in ca.log
    finally:
        ca.stop()


def test_issuer_url_without_https_needs_a_jwks(ca_home):
    from helpers import run_meshca

    proc = run_meshca(
        "serve", "--home", str(ca_home), "--k8s-issuer", "kubernetes/serviceaccount", check=False
    )
    assert proc.returncode == 1 and "--k8s-jwks: required" in proc.stderr
