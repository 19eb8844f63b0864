"""Revocation: within one bundle poll, a revoked workload's open connection is closed, its new
connections fail, the app receives nothing from it, and the CA refuses its renewal."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time

from conftest import FRONTEND, Mesh
from helpers import curl, curl_enroll, mint_token, openssl_csr, refusals, run_meshca
from mesh import admin_get, app_log, hostport, proxy_get

TESTER = "spiffe://cluster.local/ns/tools/sa/tester"
POLL = 0.5


def tls_client(mesh, chain, key):
    ctx = ssl.create_default_context(cafile=str(mesh.ca.bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(chain), str(key))
    host, port = mesh.inbound.split(":")
    s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10))
    return s


def get(s, path):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        [
            v
            for k, v in (line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
            if k.lower() == b"content-length"
        ][0]
    )
    while len(body) < length:
        body += s.recv(65536)
    return head.split(b" ")[1]


def test_revoked_workload_is_cut_off(tmp_path):
    mesh = Mesh(tmp_path, ca_extra={"bundle_poll": POLL, "retry_max": 1})
    try:
        key, csr = openssl_csr(tmp_path, "tester")
        status, doc = curl_enroll(mesh.ca, csr, mint_token(mesh.ca.home, TESTER))
        assert status == 200
        chain = tmp_path / "tester.pem"
        chain.write_text(doc["certificate_chain"])

        open_conn = tls_client(mesh, chain, key)
        assert get(open_conn, "/before") == b"200"
        assert proxy_get(mesh.frontend, "http://backend.default/before")[0] == 200

        out = run_meshca("revoke", "--home", str(mesh.ca.home), "--serial", doc["serial"])
        assert doc["serial"] in out.stdout
        out = json.loads(
            run_meshca(
                "revoke", "--home", str(mesh.ca.home), "--spiffe-id", FRONTEND, "--json"
            ).stdout
        )
        assert [r["spiffe_id"] for r in out["revoked"]] == [FRONTEND]
        status, body, _ = curl(mesh.ca, "/v1/bundle")
        assert doc["serial"] in json.loads(body)["revoked"]

        before = len(app_log(mesh.app_log))
        time.sleep(POLL * 3)
        # the open connection was closed by backend's sidecar
        open_conn.settimeout(5)
        try:
            closed = open_conn.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            closed = True
        assert closed
        # new connections with the revoked certificate get nothing
        try:
            again = tls_client(mesh, chain, key)
            assert get(again, "/after") is None
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            pass
        # frontend is revoked too: its calls fail and the app sees nothing
        status, body, _ = proxy_get(mesh.frontend, "http://backend.default/after")
        assert status == 502, body
        assert len(app_log(mesh.app_log)) == before
        assert "revoked" in mesh.backend.stderr
        _, st = admin_get(mesh.backend, "/status")
        assert doc["serial"] in st["bundle"]["revoked"]

        # the CA refuses the revoked sidecar's renewal
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar",
                "rotate",
                "--admin",
                hostport(mesh.frontend.urls["admin"]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 1
        assert any(
            r["code"] == "revoked" and r["spiffe_id"] == FRONTEND for r in refusals(mesh.ca.home)
        )
    finally:
        mesh.stop()


def test_revoke_errors(ca_home):
    res = run_meshca("revoke", "--home", str(ca_home), "--serial", "abcd", check=False)
    assert res.returncode == 1 and "no certificate with serial abcd" in res.stderr
    res = run_meshca("revoke", "--home", str(ca_home), check=False)
    assert res.returncode == 2 and "one of the arguments --serial --spiffe-id" in res.stderr
    res = run_meshca(
        "revoke", "--home", str(ca_home), "--spiffe-id", "spiffe://evil.org/x", check=False
    )
    assert res.returncode == 1 and "trust domain" in res.stderr
