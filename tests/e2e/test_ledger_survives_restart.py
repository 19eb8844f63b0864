"""A used join token stays used after the CA restarts; issuances and refusals are still listed."""

from __future__ import annotations

from helpers import curl_enroll, mint_token, openssl_csr, run_meshca, start_ca, workload_certs

WEB = "spiffe://cluster.local/ns/default/sa/web"


def test_token_stays_used_across_restart(tmp_path, ca_home):
    token = mint_token(ca_home, WEB)
    ca = start_ca(ca_home)
    try:
        _, csr = openssl_csr(tmp_path, "one")
        status, doc = curl_enroll(ca, csr, token)
        assert status == 200
    finally:
        ca.stop()
    assert ca.proc.returncode == 0, "SIGTERM stops the CA cleanly"

    ca = start_ca(ca_home)
    try:
        _, csr = openssl_csr(tmp_path, "two")
        status, again = curl_enroll(ca, csr, token)
        assert status == 401 and "already been used" in again["detail"]
    finally:
        ca.stop()
    rows = workload_certs(ca_home)
    assert [r["serial"] for r in rows] == [doc["serial"]]
    status_doc = run_meshca("status", "--home", str(ca_home), "--json").stdout
    assert '"refused": 1' in status_doc and '"join_tokens_used": 1' in status_doc
