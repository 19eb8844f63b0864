"""`sidecar identity` and `sidecar rotate` as run with kubectl exec; the CA going away.

While the CA is down the sidecar keeps serving on its current certificate and
says so in its log and admin endpoint; it recovers when the CA returns.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import BACKEND, Mesh
from mesh import admin_get, hostport, proxy_get


def sidecar_cmd(*args):
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60
    )


def test_identity_rotate_and_ca_outage(tmp_path):
    mesh = Mesh(tmp_path, ca_extra={"retry_max": 1})
    try:
        admin = hostport(mesh.backend.urls["admin"])
        res = sidecar_cmd("identity", "--admin", admin, "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["spiffe_id"] == BACKEND and doc["chain_valid"] is True
        assert 86000 < doc["seconds_remaining"] <= 86400
        assert len(doc["sha256"]) == 64 and doc["issuer"].startswith("CN=meshca issuing")
        human = sidecar_cmd("identity", "--admin", admin).stdout
        assert f"SPIFFE ID:   {BACKEND}" in human and "valid against the current bundle" in human

        res = sidecar_cmd("rotate", "--admin", admin)
        assert res.returncode == 0, res.stderr
        new_serial = res.stdout.strip()
        assert new_serial != doc["serial"]
        assert (
            json.loads(sidecar_cmd("identity", "--admin", admin, "--json").stdout)["serial"]
            == new_serial
        )
        ledger = json.loads(
            subprocess.run(
                [sys.executable, "-m", "meshca", "certs", "--home", str(mesh.ca.home), "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert any(r["serial"] == new_serial and r["credential"] == "renewal" for r in ledger)

        # The CA goes away: rotation fails clearly, traffic keeps flowing.
        mesh.ca.stop()
        res = sidecar_cmd("rotate", "--admin", admin)
        assert res.returncode == 1 and "cannot reach the CA" in res.stderr
        assert proxy_get(mesh.frontend, "http://backend.default/during-outage")[0] == 200
        status, st = admin_get(mesh.backend, "/status")
        assert st["state"] == "renewal_failing" and "cannot reach the CA" in st["last_error"]
        assert "renewal failed, serving on the current certificate" in mesh.backend.stderr
        ready, _ = admin_get(mesh.backend, "/ready")
        assert ready == 200

        res = sidecar_cmd("identity", "--admin", "127.0.0.1:1")
        assert res.returncode != 0 and "cannot reach the admin endpoint" in res.stderr
    finally:
        mesh.stop()


def test_health_port_serves_only_readiness(mesh):
    import urllib.error
    import urllib.request

    with urllib.request.urlopen(mesh.backend.urls["health"] + "/healthz/ready") as r:
        assert r.status == 200 and json.loads(r.read())["ready"] is True
    for path in ("/identity", "/rotate", "/healthz"):
        try:
            urllib.request.urlopen(mesh.backend.urls["health"] + path)
        except urllib.error.HTTPError as e:
            assert e.code in (404, 405) and json.loads(e.read())["error"]
        else:
            raise AssertionError(f"{path} must not be served on the health port")
    assert mesh.backend.urls["admin"].startswith("http://127.0.0.1:")


def test_check_command(mesh):
    from conftest import FRONTEND

    admin = hostport(mesh.frontend.urls["admin"])
    res = sidecar_cmd("check", mesh.inbound, "--admin", admin, "--expect-id", BACKEND, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["spiffe_id"] == BACKEND and doc["chain_valid"] and doc["identity_ok"]
    res = sidecar_cmd("check", mesh.inbound, "--admin", admin, "--expect-id", FRONTEND)
    assert res.returncode == 1 and "DOES NOT MATCH" in res.stdout
    # The CA's own port: chains to the bundle, but it is meshca, not backend.
    ca = mesh.ca.url.removeprefix("https://")
    res = sidecar_cmd("check", ca, "--admin", admin, "--json")
    doc = json.loads(res.stdout)
    assert doc["spiffe_id"].endswith("/ns/mesh-system/sa/meshca") and doc["chain_valid"]
    # A server from another CA does not verify.
    import socket
    import ssl
    import threading

    import trustme

    other = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.issue_cert("127.0.0.1").configure_cert(ctx)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve_once():
        conn, _ = srv.accept()
        try:
            ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    for _ in range(2):
        threading.Thread(target=serve_once, daemon=True).start()
    res = sidecar_cmd("check", f"127.0.0.1:{port}", "--admin", admin)
    srv.close()
    assert res.returncode == 1 and "DOES NOT VERIFY" in res.stdout, res.stdout


def test_expired_certificate_is_reported(tmp_path):
    """CA gone and the certificate runs out: identity exits 1, readiness fails, state 'expired'."""
    mesh = Mesh(tmp_path, ca_args=("--cert-ttl", "3"), ca_extra={"retry_max": 1})
    try:
        mesh.ca.stop()
        admin = hostport(mesh.backend.urls["admin"])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            res = sidecar_cmd("identity", "--admin", admin, "--json")
            if json.loads(res.stdout)["expired"]:
                break
            time.sleep(0.5)
        assert res.returncode == 1
        assert "(EXPIRED)" in sidecar_cmd("identity", "--admin", admin).stdout
        assert admin_get(mesh.backend, "/ready")[0] == 503
        time.sleep(1.5)  # let one more renewal attempt fail after expiry
        assert admin_get(mesh.backend, "/status")[1]["state"] == "expired"
        assert "certificate EXPIRED" in mesh.backend.stderr
    finally:
        mesh.stop()


def test_new_handshakes_use_the_new_certificate_at_once(mesh):
    """After a rotation the very next handshake presents the new certificate."""
    admin_b = hostport(mesh.backend.urls["admin"])
    admin_f = hostport(mesh.frontend.urls["admin"])
    new_serial = sidecar_cmd("rotate", "--admin", admin_b).stdout.strip()
    _, ident = admin_get(mesh.backend, "/identity")
    assert ident["serial"] == new_serial
    res = sidecar_cmd("check", mesh.inbound, "--admin", admin_f, "--json")
    doc = json.loads(res.stdout)
    assert doc["sha256"] == ident["sha256"] and doc["serial"].lstrip("0") == new_serial.lstrip("0")
