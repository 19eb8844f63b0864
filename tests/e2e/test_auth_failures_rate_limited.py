"""Failed authentications at the CA are limited per source address as well as per identity:
past its budget, every request from that address gets 429 with Retry-After (a good token
too, recorded in the ledger), while other addresses are served as before."""

from __future__ import annotations

import json

from helpers import curl, mint_token, openssl_csr, refusals, request_json, start_ca


def enroll(ca, body, token, source):
    status, text, headers = curl(
        ca,
        "/v1/certificates",
        *("--interface", source, "-H", "Content-Type: application/json"),
        *("-H", f"Authorization: Bearer {token}", "--data-binary", f"@{body}"),
    )
    return status, json.loads(text), headers


def test_failed_authentications_limited_per_source_address(tmp_path, ca_home):
    ca = start_ca(ca_home, "--auth-fail-burst", "5", "--auth-fail-rate", "0.01")
    try:
        _, csr = openssl_csr(tmp_path, "web")
        body = tmp_path / "req.json"
        body.write_text(request_json(csr.read_text()))
        web = "spiffe://cluster.local/ns/shop/sa/web"
        for _ in range(5):
            status, doc, _ = enroll(ca, body, "not-a-token", "127.0.0.2")
            assert status == 401 and doc["error"] == "invalid_token"
        status, doc, headers = enroll(ca, body, "not-a-token", "127.0.0.2")
        assert status == 429 and doc["error"] == "rate_limited", doc
        assert int(headers["retry-after"]) >= 1
        # a good token from the same address is refused too, and the ledger says why
        status, doc, _ = enroll(ca, body, mint_token(ca_home, web), "127.0.0.2")
        assert status == 429 and "127.0.0.2" in doc["detail"]
        limited = [r for r in refusals(ca_home) if r["code"] == "rate_limited"]
        assert len(limited) == 2 and all("127.0.0.2" in r["reason"] for r in limited)
        # another address is served as usual
        status, doc, _ = enroll(ca, body, "not-a-token", "127.0.0.3")
        assert status == 401
        status, doc, _ = enroll(ca, body, mint_token(ca_home, web), "127.0.0.3")
        assert status == 200 and doc["spiffe_id"] == web
        # the admin API shares the budget: the spent address is refused there as well
        status, text, _ = curl(
            ca, "/v1/admin/rotate", "--interface", "127.0.0.2", "--data-binary", "{}"
        )
        assert status == 429, text
        status, _, _ = curl(ca, "/healthz", "--interface", "127.0.0.2")
        assert status == 200  # what needs no authentication stays open
    finally:
        ca.stop()
