"""frontend -> its sidecar (outbound, plain HTTP) -> mTLS -> backend's sidecar (inbound) -> app.

The app sees the caller's SPIFFE ID in X-Forwarded-Client-Cert written by its
own sidecar, never a client-supplied one; bodies stream through intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from conftest import BACKEND, FRONTEND
from mesh import admin_get, app_log, proxy_get


def test_get_with_python_through_proxy(mesh):
    status, body, headers = proxy_get(mesh.frontend, "http://backend.default/orders/42?x=1")
    assert status == 200, body
    seen = json.loads(body)
    assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/orders/42", "x=1")
    h = {k.lower(): v for k, v in seen["headers"].items()}
    assert h["host"] == "backend.default"
    _, front = admin_get(mesh.frontend, "/identity")
    assert h["x-forwarded-client-cert"] == (f"By={BACKEND};Hash={front['sha256']};URI={FRONTEND}")
    assert h["x-forwarded-proto"] == "https"
    assert "proxy-connection" not in h and "connection" not in h


def test_curl_with_http_proxy_env_and_spoofed_xfcc(mesh):
    env = {**os.environ, "http_proxy": mesh.frontend.urls["outbound"], "no_proxy": ""}
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-H",
            "X-Forwarded-Client-Cert: By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
            "-H",
            "x-forwarded-proto: http",
            "-H",
            "Connection: keep-alive, X-Secret",
            "-H",
            "X-Secret: hop",
            "http://backend.default/headers",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    ).stdout
    h = {k.lower(): v for k, v in json.loads(out)["headers"].items()}
    assert h["x-forwarded-client-cert"].endswith(f";URI={FRONTEND}")
    assert "kube-system" not in h["x-forwarded-client-cert"]
    assert h["x-forwarded-proto"] == "https"
    assert "x-secret" not in h, "a header named in Connection is hop-by-hop"


def test_host_header_form(mesh):
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-H",
            "Host: backend.default.svc.cluster.local",
            mesh.frontend.urls["outbound"] + "/by-host",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert json.loads(out)["path"] == "/by-host"


def test_large_upload_streams_intact(mesh, tmp_path):
    body = os.urandom(1 << 20) * 24  # 24 MiB
    f = tmp_path / "big"
    f.write_bytes(body)
    env = {**os.environ, "http_proxy": mesh.frontend.urls["outbound"], "no_proxy": ""}
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
        out = subprocess.run(
            ["curl", "-sS", "--data-binary", f"@{f}", *extra, "http://backend.default/upload"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        ).stdout
        seen = json.loads(out)
        assert seen["body_bytes"] == len(body)
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_keep_alive_reuses_connections(mesh):
    """Several calls on one client connection all succeed (pooled upstream connections)."""
    env = {**os.environ, "http_proxy": mesh.frontend.urls["outbound"], "no_proxy": ""}
    args = []
    for i in range(20):
        args += ["-o", "/dev/null", f"http://backend.default/k/{i}"]
    out = subprocess.run(
        ["curl", "-sS", "-w", "%{http_code}\n", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    assert out.split() == ["200"] * 20


def test_unknown_service_sends_nothing(mesh):
    before = len(app_log(mesh.app_log))
    status, body, _ = proxy_get(mesh.frontend, "http://payments.default/pay")
    assert status == 404 and json.loads(body)["error"] == "unknown_service"
    assert len(app_log(mesh.app_log)) == before


def test_server_identity_mismatch_is_refused(mesh):
    """impostor.default leads to backend's sidecar but expects another ID: 502, nothing sent."""
    before = len(app_log(mesh.app_log))
    status, body, _ = proxy_get(mesh.frontend, "http://impostor.default/secret")
    doc = json.loads(body)
    assert status == 502 and doc["error"] == "peer_identity_mismatch"
    assert BACKEND in doc["detail"]
    assert len(app_log(mesh.app_log)) == before


def test_access_log_lines(mesh):
    proxy_get(mesh.frontend, "http://backend.default/logged?token=s3cr3tvalue")
    import time

    time.sleep(1.5)  # the log is flushed at least every second
    inbound = [json.loads(line) for line in mesh.backend.lines if line.startswith("{")]
    outbound = [json.loads(line) for line in mesh.frontend.lines if line.startswith("{")]
    last_in = [r for r in inbound if r["path"] == "/logged"][-1]
    last_out = [r for r in outbound if r["path"] == "/logged"][-1]
    assert last_in["direction"] == "inbound" and last_in["peer"] == FRONTEND
    assert last_in["status"] == 200 and last_in["method"] == "GET"
    assert last_out["direction"] == "outbound" and last_out["peer"] == BACKEND
    assert {"ts", "ms", "bytes_in", "bytes_out"} <= set(last_in)
    assert "s3cr3tvalue" not in mesh.backend.stdout + mesh.frontend.stdout


def test_tokens_and_keys_never_logged(mesh):
    for name, proc in (("backend", mesh.backend), ("frontend", mesh.frontend)):
        token = (mesh.root / name / "token").read_text().strip()
        out = proc.stdout + proc.stderr
        assert token not in out and token.split(".")[2] not in out
        assert "PRIVATE KEY" not in out
