"""Rotation and revocation through a running CA, as the CronJob does it (no access to the keys).

Only configured admin identities may call /v1/admin/*, by mTLS or with a
projected ServiceAccount token; a running CA picks up what `meshca rotate
--home` changed within its reload interval.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from helpers import curl, curl_enroll, mint_token, openssl_csr, run_meshca, start_ca

ROTATOR = "spiffe://cluster.local/ns/mesh-system/sa/rotator"
ISSUER = "https://kubernetes.default.svc.cluster.local"


@pytest.fixture
def setup(tmp_path, ca_home):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    ca = start_ca(
        ca_home,
        "--admin-id",
        ROTATOR,
        "--reload-interval",
        "0.5",
        "--k8s-issuer",
        ISSUER,
        "--k8s-jwks",
        str(jwks),
    )
    try:
        certs = {}
        for name, sid in (("rotator", ROTATOR), ("web", "spiffe://cluster.local/ns/a/sa/web")):
            k, csr = openssl_csr(tmp_path, name)
            status, doc = curl_enroll(ca, csr, mint_token(ca_home, sid))
            assert status == 200
            chain = tmp_path / f"{name}.pem"
            chain.write_text(doc["certificate_chain"])
            certs[name] = (chain, k, doc["serial"])
        yield ca, certs, key, tmp_path
    finally:
        ca.stop()


def remote(ca, *args):
    return subprocess.run(
        [sys.executable, "-m", "meshca", *args, "--ca-url", ca.url, "--ca-bundle", str(ca.bundle)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def roots_in_bundle(ca):
    _, body, _ = curl(ca, "/v1/bundle")
    return json.loads(body)["roots"].count("BEGIN CERTIFICATE")


def test_rotate_over_mtls_as_admin(setup):
    ca, certs, _, _ = setup
    chain, key, _ = certs["rotator"]
    res = remote(
        ca,
        "rotate",
        "--cert",
        str(chain),
        "--key",
        str(key),
        "--json",
        "--start-root-rotation",
        "--propagation-wait",
        "60",
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["action"] == "prepare_root"
    assert roots_in_bundle(ca) == 2, "applied at once"
    dry = remote(
        ca,
        "rotate",
        "--cert",
        str(chain),
        "--key",
        str(key),
        "--json",
        "--dry-run",
        "--propagation-wait",
        "0",
    )
    assert json.loads(dry.stdout)["action"] == "activate_root"
    status = json.loads(run_meshca("status", "--home", str(ca.home), "--json").stdout)
    assert status["root_rotation"]["stage"] == "prepared"


def test_non_admins_are_refused(setup):
    ca, certs, _, _ = setup
    chain, key, _ = certs["web"]
    res = remote(ca, "rotate", "--cert", str(chain), "--key", str(key), "--start-root-rotation")
    assert res.returncode == 1 and "403" in res.stderr and "not an admin identity" in res.stderr
    status, body, _ = curl(ca, "/v1/admin/rotate", "--data-binary", "{}")
    assert status == 401
    assert roots_in_bundle(ca) == 1


def test_rotate_with_a_projected_service_account_token(setup):
    ca, _, key, tmp_path = setup
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": ISSUER,
            "aud": ["meshca"],
            "sub": "system:serviceaccount:mesh-system:rotator",
            "iat": now,
            "exp": now + 600,
            "kubernetes.io": {"namespace": "mesh-system", "serviceaccount": {"name": "rotator"}},
        },
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    tok = tmp_path / "token"
    tok.write_text(token)
    res = remote(ca, "rotate", "--token-file", str(tok), "--force-intermediate", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["action"] == "rotate_intermediate"


def test_revoke_through_the_api(setup):
    ca, certs, _, _ = setup
    chain, key, _ = certs["rotator"]
    _, _, web_serial = certs["web"]
    res = remote(ca, "revoke", "--cert", str(chain), "--key", str(key), "--serial", web_serial)
    assert res.returncode == 0 and web_serial in res.stdout, res.stderr
    _, body, _ = curl(ca, "/v1/bundle")
    assert web_serial in json.loads(body)["revoked"]


def test_running_ca_picks_up_changes_made_on_disk(setup):
    ca, _, _, _ = setup
    run_meshca("rotate", "--home", str(ca.home), "--start-root-rotation")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and roots_in_bundle(ca) != 2:
        time.sleep(0.2)
    assert roots_in_bundle(ca) == 2
    assert "CA state reloaded" in ca.log


def test_a_bad_state_on_disk_keeps_the_last_good_one(setup):
    """Fail closed on reload: a state.json that does not load is refused; the CA keeps serving."""
    ca, certs, _, _ = setup
    state = ca.home / "state.json"
    good = state.read_text()
    _, before, _ = curl(ca, "/v1/bundle")
    try:
        doc = json.loads(good)
        doc["roots"] = ["root-00000000"]  # a root file that does not exist
        doc["issuing_root"] = "root-00000000"
        state.write_text(json.dumps(doc))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "keeping the current CA state" not in ca.log:
            time.sleep(0.2)
        assert "keeping the current CA state" in ca.log
        status, after, _ = curl(ca, "/v1/bundle")
        assert status == 200 and json.loads(after)["roots"] == json.loads(before)["roots"]
        chain, key, _ = certs["web"]
        _, csr = openssl_csr(ca.home.parent, "renew-after-bad-state")
        status, doc = curl_enroll(ca, csr, None, "--cert", str(chain), "--key", str(key))
        assert status == 200, doc
    finally:
        state.write_text(good)
