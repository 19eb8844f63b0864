"""Per-identity rate limiting: past the burst: 429 with Retry-After; others unaffected."""

from __future__ import annotations

from helpers import curl_enroll, mint_token, openssl_csr, refusals, start_ca, workload_certs

WEB = "spiffe://cluster.local/ns/default/sa/web"
API = "spiffe://cluster.local/ns/default/sa/api"


def test_burst_then_429(tmp_path, ca_home):
    ca = start_ca(ca_home, "--rate", "0.1", "--burst", "3")
    try:
        tokens = [mint_token(ca_home, WEB) for _ in range(4)]
        statuses = []
        for i, token in enumerate(tokens):
            _, csr = openssl_csr(tmp_path, f"w{i}")
            status, doc = curl_enroll(ca, csr, token)
            statuses.append(status)
        assert statuses == [200, 200, 200, 429]
        assert doc["error"] == "rate_limited" and WEB in doc["detail"]
        assert refusals(ca_home)[-1]["code"] == "rate_limited"
        # Another identity is not affected by WEB's bucket.
        _, csr = openssl_csr(tmp_path, "api")
        assert curl_enroll(ca, csr, mint_token(ca_home, API))[0] == 200
        assert len(workload_certs(ca_home)) == 4
    finally:
        ca.stop()


def test_429_carries_retry_after(tmp_path, ca_home):
    from helpers import curl, request_json

    ca = start_ca(ca_home, "--rate", "0.5", "--burst", "1")
    try:
        for i in range(2):
            _, csr = openssl_csr(tmp_path, f"r{i}")
            body = tmp_path / f"r{i}.json"
            body.write_text(request_json(csr.read_text()))
            status, _, headers = curl(
                ca,
                "/v1/certificates",
                "-H",
                f"Authorization: Bearer {mint_token(ca_home, WEB)}",
                "--data-binary",
                f"@{body}",
            )
        assert status == 429
        assert 1 <= int(headers["retry-after"]) <= 2
    finally:
        ca.stop()
