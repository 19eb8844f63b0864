"""The sidecar's Prometheus endpoint as a scraper sees it: Istio's request metrics from both
sides of a call, exact under concurrency; a policy denial, a handshake without a client
certificate and a revoked peer each in their own series; the certificate-expiry gauge;
OpenMetrics on request; and `promtool check metrics` on the whole exposition."""

from __future__ import annotations

import calendar
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from conftest import BACKEND
from helpers import run_meshca
from mesh import admin_get, hostport, proxy_get, sidecar_config, start_echo, start_sidecar
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e
FRONT = "spiffe://cluster.local/ns/shop/sa/web"
POLICY = {
    "rules": [
        {"name": "no-admin", "action": "DENY", "to": {"paths": ["/admin"]}},
        {"name": "audit-gets", "action": "AUDIT", "to": {"methods": ["GET"]}},
        {"name": "web", "action": "ALLOW", "from": {"principals": [FRONT]}},
    ]
}


def with_metrics(cfg, extra: dict | None = None):
    doc = yaml.safe_load(cfg.read_text())
    doc["metrics"] = {"listen": "127.0.0.1:0"}
    doc.update(extra or {})
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def scrape(p, accept: str = "") -> tuple[str, str]:
    req = urllib.request.Request(p.urls["metrics"] + "/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode(), r.headers["Content-Type"]


def samples(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        s.value
        for s in samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def pair(ca, tmp_path):
    procs = []
    try:
        echo = start_echo()
        procs.append(echo)
        bcfg = sidecar_config(
            tmp_path, "backend", ca, BACKEND, app=hostport(echo.urls["echo"]),
            ca_extra={"bundle_poll": 0.5},
        )  # fmt: skip
        (tmp_path / "backend" / "policy.yaml").write_text(yaml.safe_dump(POLICY))
        backend = start_sidecar(with_metrics(bcfg, {"policy": {"file": "policy.yaml"}}))
        procs.append(backend)
        services = {
            "backend.default": {
                "identity": BACKEND,
                "endpoints": [hostport(backend.urls["inbound"])],
            }
        }
        fcfg = sidecar_config(tmp_path, "frontend", ca, FRONT, services=services)
        frontend = start_sidecar(with_metrics(fcfg))
        procs.append(frontend)
        yield backend, frontend
    finally:
        for p in reversed(procs):
            p.stop()


def test_request_metrics_exact_under_concurrency_and_in_the_right_series(ca, pair):
    backend, frontend = pair

    def call(n: int) -> int:
        return proxy_get(frontend, f"http://backend.default/item/{n}?q={n}")[0]

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(call, range(200)))
    assert statuses == [200] * 200
    assert proxy_get(frontend, "http://backend.default/admin")[0] == 403

    front, _ = scrape(frontend)
    back, _ = scrape(backend)
    common = {"source_principal": FRONT, "destination_principal": BACKEND}
    assert (
        value(front, "istio_requests_total", reporter="source", response_code="200", **common)
        == 200
    )
    assert (
        value(back, "istio_requests_total", reporter="destination", response_code="200", **common)
        == 200
    )
    assert (
        value(back, "istio_requests_total", reporter="destination", response_code="403", **common)
        == 1
    )
    assert (
        value(front, "istio_requests_total", reporter="source", response_code="403", **common) == 1
    )
    labels = next(
        s.labels for s in samples(front)
        if s.name == "istio_requests_total" and s.labels["response_code"] == "200"
    )  # fmt: skip
    assert labels == {
        "reporter": "source",
        "source_principal": FRONT,
        "destination_principal": BACKEND,
        "source_workload": "web",
        "source_workload_namespace": "shop",
        "destination_workload": "backend",
        "destination_workload_namespace": "default",
        "destination_service": "backend.default.svc.cluster.local",
        "request_protocol": "http",
        "response_code": "200",
        "response_flags": "-",
        "grpc_response_status": "",
        "connection_security_policy": "mutual_tls",
    }
    assert "/item" not in front and "q=" not in front  # no paths or queries in any label
    count = value(back, "istio_request_duration_milliseconds_count", response_code="200")
    assert count == 200
    assert (
        value(back, "istio_request_duration_milliseconds_bucket", le="+Inf", response_code="200")
        == 200
    )
    # the policy: 200 allowed by rule web, one denied by no-admin, every GET audited
    assert value(back, "meshca_sidecar_authz_decisions_total", action="allow", rule="web") == 200
    assert value(back, "meshca_sidecar_authz_decisions_total", action="deny", rule="no-admin") == 1
    assert (
        value(back, "meshca_sidecar_authz_decisions_total", action="audit", rule="audit-gets")
        == 201
    )

    # an unknown service: no route
    assert proxy_get(frontend, "http://nowhere.default/")[0] == 404
    front, _ = scrape(frontend)
    assert value(front, "istio_requests_total", response_code="404", response_flags="NR") == 1

    # the certificate's expiry
    _, ident = admin_get(frontend, "/identity")
    not_after = calendar.timegm(time.strptime(ident["not_after"], "%Y-%m-%dT%H:%M:%SZ"))
    assert value(front, "meshca_sidecar_certificate_not_after_seconds") == pytest.approx(
        not_after, abs=1
    )
    assert value(front, "meshca_sidecar_renewals_total", result="ok") >= 1


def test_handshake_failures_and_a_revoked_peer_by_reason(ca, pair):
    backend, frontend = pair
    host, port = hostport(backend.urls["inbound"]).rsplit(":", 1)
    # a client with no certificate
    ctx = ssl.create_default_context(cafile=str(ca.bundle))
    ctx.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                tls.recv(100)
        except (ssl.SSLError, ConnectionResetError, OSError):
            pass
    # the frontend's certificate is revoked: the backend refuses its next connection
    assert proxy_get(frontend, "http://backend.default/")[0] == 200
    run_meshca("revoke", "--home", str(ca.home), "--spiffe-id", FRONT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = proxy_get(frontend, "http://backend.default/")[0]
        back, _ = scrape(backend)
        if value(back, "meshca_sidecar_tls_handshake_failures_total", reason="revoked"):
            break
        time.sleep(0.3)
    back, _ = scrape(backend)
    assert (
        value(
            back,
            "meshca_sidecar_tls_handshake_failures_total",
            direction="inbound",
            reason="no_certificate",
        )
        == 1
    )
    assert (
        value(
            back,
            "meshca_sidecar_tls_handshake_failures_total",
            direction="inbound",
            reason="revoked",
        )
        >= 1
    )
    assert status == 502


def test_openmetrics_and_promtool(pair):
    backend, frontend = pair
    assert proxy_get(frontend, "http://backend.default/")[0] == 200
    text, ctype = scrape(frontend, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and text.rstrip().endswith("# EOF")
    text, ctype = scrape(backend)
    assert ctype.startswith("text/plain")
    with urllib.request.urlopen(backend.urls["metrics"] + "/stats/prometheus", timeout=10) as r:
        assert b"istio_requests_total" in r.read()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make test installs it)")
    for p in (backend, frontend):
        text, _ = scrape(p)
        out = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        problems = [
            line for line in (out.stdout + out.stderr).splitlines()
            if line.strip() and "istio_request_duration_milliseconds" not in line
        ]  # fmt: skip
        assert problems == [], out.stdout + out.stderr


def test_sidecar_stats_for_a_person(pair):
    """`kubectl exec POD -c sidecar -- sidecar stats`: the last minute per peer."""
    import json
    import sys

    backend, frontend = pair
    for n in range(30):
        assert proxy_get(frontend, f"http://backend.default/{n}")[0] == 200
    assert proxy_get(frontend, "http://backend.default/admin")[0] == 403
    host, port = hostport(backend.urls["inbound"]).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:  # no client certificate
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    def stats(p, *extra: str) -> str:
        cmd = [sys.executable, "-m", "sidecar", "stats", "--admin", hostport(p.urls["admin"])]
        return subprocess.run(cmd + list(extra), capture_output=True, text=True, check=True).stdout

    doc = json.loads(stats(backend, "--json"))
    (row,) = doc["peers"]
    assert (row["direction"], row["peer"], row["requests"]) == ("inbound", FRONT, 31)
    assert row["success_rate"] == 1.0 and row["authz_denials"] == 1
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert doc["tls_handshake_failures"] == {"inbound": 1}
    front = json.loads(stats(frontend, "--json"))
    assert [(r["direction"], r["peer"], r["requests"]) for r in front["peers"]] == [
        ("outbound", "backend.default", 31)
    ]
    text = stats(backend)
    assert text.splitlines()[0].split() == [
        "DIRECTION", "PEER", "SUCCESS", "RPS", "P50", "P95", "P99", "DENIED",
    ]  # fmt: skip
    assert f"inbound   {FRONT}" in text and "100.00%" in text
    assert "TLS handshakes refused in the last 60 s: inbound 1" in text
