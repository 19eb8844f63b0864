"""GET /v1/bundle serves the roots with an ETag (304 when unchanged); /healthz; JSON 404/405."""

from __future__ import annotations

import json

from cryptography import x509
from helpers import curl, run_meshca


def test_bundle_matches_cli_and_supports_etag(ca):
    status, body, headers = curl(ca, "/v1/bundle")
    assert status == 200
    doc = json.loads(body)
    assert doc["trust_domain"] == "cluster.local"
    assert doc["sequence"] == 1
    assert doc["roots"] == run_meshca("bundle", "--home", str(ca.home)).stdout
    [root] = x509.load_pem_x509_certificates(doc["roots"].encode())
    assert root.subject == root.issuer
    etag = headers["etag"]
    status, body, headers = curl(ca, "/v1/bundle", "-H", f"If-None-Match: {etag}")
    assert status == 304 and body == "" and headers["etag"] == etag
    status, _, _ = curl(ca, "/v1/bundle", "-H", 'If-None-Match: "stale"')
    assert status == 200


def test_healthz(ca):
    status, body, _ = curl(ca, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_unknown_path_and_method_are_json_errors(ca):
    status, body, _ = curl(ca, "/v1/nope")
    assert status == 404 and json.loads(body)["error"] == "not_found"
    status, body, _ = curl(ca, "/v1/certificates")  # GET on a POST-only route
    assert status == 405 and json.loads(body)["error"] == "method_not_allowed"


def test_server_certificate_names(ca):
    """The CA's serving certificate chains to the bundle and names localhost, meshca, 127.0.0.1."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca.bundle))
    host, port = ca.host_port
    for name in ("localhost", "meshca", "meshca.mesh-system.svc"):
        with socket.create_connection((host, port)) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/mesh-system/sa/meshca"
    ]
