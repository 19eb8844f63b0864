"""Revoking a SPIFFE ID also blocks new certificates for it: a fresh join token (or its
ServiceAccount token) is refused until `meshca unrevoke`, or until the time the operator
gave; everything is in the ledger. Certificates revoked before stay revoked."""

from __future__ import annotations

import json
import sqlite3
import time

from helpers import (
    curl,
    curl_enroll,
    ledger_certs,
    mint_token,
    openssl_csr,
    refusals,
    run_meshca,
    start_ca,
)

WEB = "spiffe://cluster.local/ns/shop/sa/web"
ADMIN = "spiffe://cluster.local/ns/mesh-system/sa/rotator"


def enroll(ca, tmp_path, sid, name="web"):
    _, csr = openssl_csr(tmp_path, name)
    return curl_enroll(ca, csr, mint_token(ca.home, sid))


def test_revoked_identity_cannot_enroll_until_unrevoked(tmp_path, ca_home):
    ca = start_ca(ca_home, "--admin-id", ADMIN)
    try:
        status, first = enroll(ca, tmp_path, WEB)
        assert status == 200

        out = run_meshca("revoke", "--home", str(ca_home), "--spiffe-id", WEB)
        assert first["serial"] in out.stdout
        assert f"new certificates for {WEB} refused until meshca unrevoke" in out.stdout

        status, doc = enroll(ca, tmp_path, WEB, "web2")
        assert status == 403 and doc["error"] == "revoked_identity", doc
        assert "meshca unrevoke" in doc["detail"]
        assert refusals(ca_home)[0]["code"] == "revoked_identity"
        assert len([c for c in ledger_certs(ca_home) if c["spiffe_id"] == WEB]) == 1
        # another identity is not affected
        status, _ = enroll(ca, tmp_path, "spiffe://cluster.local/ns/shop/sa/other", "other")
        assert status == 200

        # unrevoke through the CA's admin API, as an admin identity (mTLS)
        key, csr = openssl_csr(tmp_path, "admin")
        status, adm = curl_enroll(ca, csr, mint_token(ca_home, ADMIN))
        chain = tmp_path / "admin.pem"
        chain.write_text(adm["certificate_chain"])
        out = run_meshca(
            "unrevoke",
            *("--spiffe-id", WEB, "--ca-url", ca.url, "--ca-bundle", str(ca.bundle)),
            *("--cert", str(chain), "--key", str(key), "--json"),
        )
        assert json.loads(out.stdout) == {"spiffe_id": WEB, "unblocked": True}

        status, again = enroll(ca, tmp_path, WEB, "web3")
        assert status == 200
        status, body, _ = curl(ca, "/v1/bundle")
        revoked = json.loads(body)["revoked"]
        assert first["serial"] in revoked and again["serial"] not in revoked

        # a second unrevoke is a clear error naming the ID, and changes nothing
        out = run_meshca("unrevoke", "--home", str(ca_home), "--spiffe-id", WEB, check=False)
        assert out.returncode == 1 and f"{WEB} is not blocked" in out.stderr
        with sqlite3.connect(ca_home / "ledger.db") as db:
            events = [r[0] for r in db.execute("SELECT kind FROM events ORDER BY id")]
        assert events[-2:] == ["revoke", "unrevoke"]
    finally:
        ca.stop()


def test_a_block_with_an_end(tmp_path, ca_home):
    ca = start_ca(ca_home)
    try:
        # 6 s: room for the revoke and the first enrollment on a loaded machine (2 s flaked)
        run_meshca("revoke", "--home", str(ca_home), "--spiffe-id", WEB, "--ban-for", "6")
        status, doc = enroll(ca, tmp_path, WEB)
        assert status == 403 and doc["error"] == "revoked_identity" and " until 20" in doc["detail"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, doc = enroll(ca, tmp_path, WEB, f"web{int(time.monotonic() * 1000)}")
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, doc
    finally:
        ca.stop()


def test_bad_input_changes_nothing(tmp_path, ca_home):
    for args, why in (
        (("--serial", "01", "--ban-for", "5"), "--ban-for: goes with --spiffe-id"),
        (("--spiffe-id", WEB, "--ban-for", "0"), "--ban-for: must be a positive"),
        (("--spiffe-id", "spiffe://other.domain/ns/a/sa/b"), "not in trust domain"),
    ):
        out = run_meshca("revoke", "--home", str(ca_home), *args, check=False)
        assert out.returncode == 1 and why in out.stderr, out.stderr
    out = run_meshca("unrevoke", "--home", str(ca_home), "--spiffe-id", "nope", check=False)
    assert out.returncode == 1 and "spiffe_id" in out.stderr
