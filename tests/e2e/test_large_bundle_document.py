"""A bundle document far larger than one TLS record (thousands of revoked serials, after a
revocation of a large Deployment) reaches the sidecar whole: every serial is refused."""

from __future__ import annotations

import datetime as dt
import secrets
import sqlite3
import time

from helpers import tail
from mesh import admin_get, sidecar_config, start_sidecar

WEB = "spiffe://cluster.local/ns/shop/sa/web"


def test_thousands_of_revocations_arrive_whole(tmp_path, ca):
    p = start_sidecar(sidecar_config(tmp_path, "web", ca, WEB, ca_extra={"bundle_poll": 0.3}))
    try:
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        serials = [secrets.token_hex(20) for _ in range(3000)]  # about 130 KB of JSON
        with sqlite3.connect(ca.home / "ledger.db") as db:
            db.executemany(
                "INSERT INTO certificates (serial, spiffe_id, not_before, not_after, issued_at,"
                " credential, issuer, sha256, peer, revoked_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (s, WEB, later, later, later, "join_token", "00", "00", None, later)
                    for s in serials
                ],
            )
        deadline = time.monotonic() + 20
        revoked: list = []
        while time.monotonic() < deadline:
            revoked = admin_get(p, "/status")[1]["bundle"]["revoked"]
            if len(revoked) >= len(serials):
                break
            time.sleep(0.2)
        assert set(serials) <= set(revoked), tail(p.stderr)
        assert admin_get(p, "/status")[1]["bundle"]["last_error"] is None
    finally:
        p.stop()
