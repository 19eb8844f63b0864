"""The sidecar knows the CA by its SPIFFE ID, not only by a host name: a workload that got a
certificate with the CA's DNS name (a mistaken `meshca token --dns`) and answers in the CA's
place is refused before anything is sent to it; it cannot hand out roots or certificates."""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml
from helpers import curl_enroll, mint_token, openssl_csr, tail
from mesh import admin_get, sidecar_config, start_sidecar

WEB = "spiffe://cluster.local/ns/shop/sa/web"


def test_an_impostor_with_the_cas_dns_name_is_refused(tmp_path, ca):
    key, csr = openssl_csr(tmp_path, "impostor")
    evil = "spiffe://cluster.local/ns/evil/sa/evil"
    status, doc = curl_enroll(ca, csr, mint_token(ca.home, evil, dns=("localhost",)))
    assert status == 200
    chain = tmp_path / "impostor.pem"
    chain.write_text(doc["certificate_chain"])
    requests: list[str] = []

    class Impostor(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            requests.append(self.path)
            body = json.dumps(
                {
                    "trust_domain": "cluster.local",
                    "roots": ca.bundle.read_text(),
                    "sequence": 999,
                    "revoked": [],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(chain), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    procs = []
    try:
        port = server.server_address[1]
        for name, url in (("victim", f"https://localhost:{port}"), ("control", None)):
            cfg = sidecar_config(tmp_path, name, ca, WEB)
            if url:
                doc = yaml.safe_load(cfg.read_text())
                doc["ca"]["url"] = url
                cfg.write_text(yaml.safe_dump(doc))
            p = start_sidecar(cfg, wait_ready=name == "control")
            procs.append(p)
        victim = procs[0]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "is not the CA" not in victim.stderr:
            time.sleep(0.1)
        assert "is not the CA" in victim.stderr, tail(victim.stderr)
        assert f"names {evil}" in victim.stderr
        assert requests == []  # refused right after the handshake: no request was sent
        code, _ = admin_get(victim, "/ready")
        assert code == 503
        code, st = admin_get(victim, "/status")
        assert st["bundle"]["source"] == "bootstrap" and st["bundle"]["sequence"] is None
        code, _ = admin_get(procs[1], "/ready")  # the real CA at the same kind of URL is fine
        assert code == 200
    finally:
        for p in procs:
            p.stop()
        server.shutdown()
