"""A pod enrolls with a Kubernetes projected ServiceAccount token checked against the JWKS.

The CA is started with `--k8s-issuer` and a JWKS file (what a cluster's
/openid/v1/jwks serves); tokens are signed as the API server signs them.
"""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import curl_enroll, openssl_csr, refusals, start_ca, workload_certs

ISSUER = "https://kubernetes.default.svc.cluster.local"


@pytest.fixture(scope="module")
def api_server_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def sa_token(
    key,
    *,
    namespace="shop",
    account="orders",
    aud="meshca",
    iss=ISSUER,
    exp_in=600,
    kid="k1",
    sub=None,
    k8s_claims=True,
    alg="RS256",
):
    now = int(time.time())
    claims = {
        "iss": iss,
        "aud": [aud],
        "sub": sub or f"system:serviceaccount:{namespace}:{account}",
        "iat": now - 5,
        "nbf": now - 5,
        "exp": now + exp_in,
    }
    if k8s_claims:
        claims["kubernetes.io"] = {
            "namespace": namespace,
            "serviceaccount": {"name": account, "uid": "7d2c0e1a-0000-4000-8000-000000000001"},
            "pod": {"name": f"{account}-6d5f7c-abcde", "uid": "5a0c-0000"},
        }
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture
def k8s_ca(tmp_path, ca_home, api_server_key):
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(api_server_key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    proc = start_ca(ca_home, "--k8s-issuer", ISSUER, "--k8s-jwks", str(jwks))
    try:
        yield proc
    finally:
        proc.stop()


def test_sa_token_enrolls_as_namespace_and_account(tmp_path, k8s_ca, api_server_key):
    _, csr = openssl_csr(tmp_path, "orders")
    status, doc = curl_enroll(k8s_ca, csr, sa_token(api_server_key))
    assert status == 200, doc
    assert doc["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/orders"
    [row] = workload_certs(k8s_ca.home)
    assert row["credential"] == "k8s_token" and row["serial"] == doc["serial"]


def test_sa_token_is_reusable_until_it_expires(tmp_path, k8s_ca, api_server_key):
    """Projected tokens are not single-use: a restarted pod enrolls again with the same one."""
    token = sa_token(api_server_key)
    for i in range(2):
        _, csr = openssl_csr(tmp_path, f"again{i}")
        assert curl_enroll(k8s_ca, csr, token)[0] == 200


other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

BAD = {
    "wrong audience": (lambda k: sa_token(k, aud="kubernetes"), "audience is not accepted"),
    "wrong issuer": (lambda k: sa_token(k, iss="https://evil.example"), "issuer is not trusted"),
    "expired": (lambda k: sa_token(k, exp_in=-120), "expired"),
    "signed by another key": (lambda k: sa_token(other_key), "signature does not verify"),
    "unknown kid": (lambda k: sa_token(k, kid="nope"), "not in the cluster's JWKS"),
    "no kubernetes.io claims": (lambda k: sa_token(k, k8s_claims=False), "kubernetes.io"),
    "sub disagrees with claims": (
        lambda k: sa_token(k, sub="system:serviceaccount:kube-system:admin"),
        "does not match",
    ),
    "HS256 with public key": (
        lambda k: sa_token(b"x" * 32, alg="HS256"),
        "algorithm is not accepted",
    ),
    "ES256 under an RSA kid": (
        lambda k: sa_token(ec.generate_private_key(ec.SECP256R1()), alg="ES256"),
        "does not match its signing key",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sa_token_is_refused(tmp_path, k8s_ca, api_server_key, case):
    make, detail = BAD[case]
    _, csr = openssl_csr(tmp_path, "bad")
    status, doc = curl_enroll(k8s_ca, csr, make(api_server_key))
    assert status == 401 and doc["error"] == "invalid_token", doc
    assert detail in doc["detail"]
    assert workload_certs(k8s_ca.home) == []
    assert refusals(k8s_ca.home)[-1]["code"] == "invalid_token"
