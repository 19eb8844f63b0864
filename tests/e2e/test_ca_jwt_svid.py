"""The CA issues JWT-SVIDs over mTLS for the caller's own ID only, and serves their keys."""

from __future__ import annotations

import json

import jwt
from helpers import curl, curl_enroll, mint_token, openssl_csr

WEB = "spiffe://cluster.local/ns/default/sa/web"


def enroll(ca, tmp_path):
    key, csr = openssl_csr(tmp_path, "web")
    status, doc = curl_enroll(ca, csr, mint_token(ca.home, WEB))
    assert status == 200
    chain = tmp_path / "web.pem"
    chain.write_text(doc["certificate_chain"])
    return chain, key


def test_jwt_svid_for_own_id_verifies_with_jwks(ca, tmp_path):
    chain, key = enroll(ca, tmp_path)
    status, body, _ = curl(
        ca,
        "/v1/jwt",
        "--cert",
        str(chain),
        "--key",
        str(key),
        "--data-binary",
        '{"audience": "orders"}',
    )
    assert status == 200, body
    doc = json.loads(body)
    status, jwks_body, headers = curl(ca, "/v1/jwks")
    assert status == 200 and "max-age" in headers["cache-control"]
    keys = jwt.PyJWKSet.from_dict(json.loads(jwks_body))
    kid = jwt.get_unverified_header(doc["token"])["kid"]
    key_obj = next(k for k in keys.keys if k.key_id == kid)
    claims = jwt.decode(
        doc["token"],
        key_obj.key,
        algorithms=["ES256"],
        audience="orders",
        issuer="meshca/cluster.local",
    )
    assert claims["sub"] == WEB and claims["exp"] - claims["iat"] == 300
    assert doc["expires_at"].endswith("Z")


def test_ttl_is_capped_and_sub_cannot_be_chosen(ca, tmp_path):
    chain, key = enroll(ca, tmp_path)
    cert = ["--cert", str(chain), "--key", str(key)]
    status, body, _ = curl(
        ca, "/v1/jwt", *cert, "--data-binary", '{"audience": "orders", "ttl": 3600}'
    )
    assert status == 200
    status, body, _ = curl(
        ca, "/v1/jwt", *cert, "--data-binary", '{"audience": "orders", "ttl": 3601}'
    )
    assert status == 400 and "lifetime" in json.loads(body)["detail"]
    status, body, _ = curl(
        ca,
        "/v1/jwt",
        *cert,
        "--data-binary",
        '{"audience": "orders", "sub": "spiffe://cluster.local/ns/a/sa/admin"}',
    )
    assert status == 400 and "unknown field 'sub'" in json.loads(body)["detail"]
    status, body, _ = curl(ca, "/v1/jwt", *cert, "--data-binary", '{"audience": ""}')
    assert status == 400


def test_no_client_certificate_no_jwt(ca):
    status, body, headers = curl(ca, "/v1/jwt", "--data-binary", '{"audience": "orders"}')
    assert status == 401 and json.loads(body)["error"] == "missing_credential"
    # a join token is not a credential for JWT-SVIDs
    token = mint_token(ca.home, WEB)
    status, body, _ = curl(
        ca,
        "/v1/jwt",
        "-H",
        f"Authorization: Bearer {token}",
        "--data-binary",
        '{"audience": "orders"}',
    )
    assert status == 401
