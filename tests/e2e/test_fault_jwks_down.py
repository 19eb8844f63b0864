"""The JWKS endpoint down, then back with a rotated key set, seen from a client with tokens.

backend's sidecar verifies tokens of an external issuer whose JWKS is served over
HTTPS (a trustme CA) by a server the test starts, stops and restarts on the same
port. While it is down, tokens signed with keys fetched before keep verifying,
whether the sidecar has seen the token before or not; a token with an unknown key
is refused. When it comes back without key k1, a token signed with k1 is refused
(401, RFC 6750 challenge) even though the sidecar had verified and cached it,
while k2's tokens and a token with the newly published k3 are accepted. No refused
request reaches the app.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
import trustme
import yaml
from conftest import BACKEND
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import curl_enroll, mint_token, openssl_csr, run_meshca, start_ca
from mesh import Proc, app_log, hostport, sidecar_config, start_echo, start_sidecar
from rotation_rig import free_port, wait_for

ISSUER = "https://issuer.test"
TESTER = "spiffe://cluster.local/ns/tools/sa/tester"


class JwksServer:
    """An HTTPS server on a fixed loopback port answering every GET with `self.doc`."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(self.ctx)
        self.port = free_port()
        self.doc: dict = {"keys": []}
        self.served = 0
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/jwks"

    def up(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = json.dumps(owner.doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                owner.served += 1

            def log_message(self, *args: object) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        httpd.daemon_threads = True
        httpd.socket = self.ctx.wrap_socket(httpd.socket, server_side=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        self._httpd = httpd

    def down(self) -> None:
        """Stop listening: fetches now meet a refused connection."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def public_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    return jwk


@pytest.fixture
def env(tmp_path: Path):
    """CA, echo app behind backend's sidecar (external issuer, JWKS refreshed every
    second), the JWKS server (up, keys k1 and k2) and a tester client certificate."""
    trust = trustme.CA()
    jwks_ca = tmp_path / "jwks-ca.pem"
    trust.cert_pem.write_to_path(str(jwks_ca))
    server = JwksServer(trust)
    keys = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("k1", "k2", "k3")}
    server.doc = {"keys": [public_jwk(keys["k1"], "k1"), public_jwk(keys["k2"], "k2")]}
    server.up()
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    procs: list = []
    try:
        ca = start_ca(home)
        procs.append(ca)
        app = start_echo(tmp_path / "app.log")
        procs.append(app)
        cfg = sidecar_config(tmp_path, "backend", ca, BACKEND, app=hostport(app.urls["echo"]))
        doc = yaml.safe_load(cfg.read_text())
        doc["jwt"] = {
            "issuers": [
                {
                    "issuer": ISSUER,
                    "audiences": ["backend"],
                    "jwks_uri": server.url,
                    "jwks_ca": str(jwks_ca),
                    "jwks_refresh": 1,
                    "jwks_min_interval": 0,
                }
            ]
        }
        cfg.write_text(yaml.safe_dump(doc))
        backend = start_sidecar(cfg)
        procs.append(backend)
        key, csr = openssl_csr(tmp_path, "tester")
        code, enrolled = curl_enroll(ca, csr, mint_token(home, TESTER))
        assert code == 200, enrolled
        chain = tmp_path / "tester.pem"
        chain.write_text(enrolled["certificate_chain"])
        yield {
            "server": server,
            "keys": keys,
            "backend": backend,
            "client": (chain, key, ca.bundle),
            "app_log": tmp_path / "app.log",
        }
    finally:
        for p in reversed(procs):
            p.stop()
        server.down()


def token(env: dict, kid: str, sub: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "backend", "sub": sub, "iat": now, "exp": now + 300}
    return jwt.encode(claims, env["keys"][kid], algorithm="ES256", headers={"kid": kid})


def call(env: dict, tok: str, path: str = "/api") -> tuple[int, dict, dict]:
    """GET on backend's inbound port with the tester's certificate and `tok`."""
    chain, key, bundle = env["client"]
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(chain), str(key))
    backend: Proc = env["backend"]
    host, port = hostport(backend.urls["inbound"]).split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=20)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {tok}"})
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
        return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_cached_keys_verify_while_down_and_a_removed_key_is_refused(env):
    server: JwksServer = env["server"]
    backend: Proc = env["backend"]
    cached_k1, cached_k2 = token(env, "k1", "alice"), token(env, "k2", "bob")
    for tok in (cached_k1, cached_k2):
        assert call(env, tok)[0] == 200  # verified, and now cached

    # Down: the sidecar's periodic refresh fails (it says so) and it keeps the keys it has.
    server.down()
    wait_for(
        "the sidecar to notice the JWKS endpoint is down",
        lambda: call(env, cached_k1)[0] == 200 and "JWKS fetch from" in backend.stderr,
        15,
        [backend],
    )
    assert call(env, cached_k1)[0] == 200
    assert call(env, cached_k2)[0] == 200
    assert call(env, token(env, "k1", "carol"))[0] == 200  # not seen before, key cached
    seen = len(app_log(env["app_log"]))
    status, body, headers = call(env, token(env, "k3", "dave"))  # a key it cannot fetch
    assert status == 401 and body["error"] == "invalid_token", body
    assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert len(app_log(env["app_log"])) == seen

    # Back, rotated: k1 left the set, k3 joined. Once a refresh succeeds, k1's tokens
    # are refused, the one cached as verified included.
    server.doc = {
        "keys": [public_jwk(env["keys"]["k2"], "k2"), public_jwk(env["keys"]["k3"], "k3")]
    }
    served = server.served
    server.up()
    # The sidecar refreshes a stale key set when a request asks for a key: keep asking.
    wait_for(
        "a JWKS fetch after the restart",
        lambda: call(env, cached_k2)[0] == 200 and server.served > served,
        15,
        [backend],
    )
    wait_for(
        "the token signed with the removed key k1 to be refused",
        lambda: call(env, cached_k1)[0] == 401,
        15,
        [backend],
    )
    seen = len(app_log(env["app_log"]))
    status, body, headers = call(env, cached_k1)
    assert status == 401 and body["error"] == "invalid_token", body
    assert "JWKS" in body["detail"], body
    assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert call(env, token(env, "k1", "erin"))[0] == 401
    assert len(app_log(env["app_log"])) == seen  # refused requests never reach the app
    assert call(env, cached_k2)[0] == 200
    assert call(env, token(env, "k3", "dave"))[0] == 200
    assert len(app_log(env["app_log"])) == seen + 2
