"""Bad enrollment input gets its clear JSON error, issues nothing, and is recorded as a refusal.

Each case is sent with curl to a real server; afterwards the ledger must hold
no new workload certificate and one refusal with the answered error code.
"""

from __future__ import annotations

import base64
import subprocess
import time

import pytest
from helpers import (
    curl,
    curl_enroll,
    mint_token,
    openssl_csr,
    refusals,
    run_meshca,
    workload_certs,
)

WEB = "spiffe://cluster.local/ns/default/sa/web"


def garbage_csr(tmp_path, ca):
    csr = tmp_path / "garbage.csr"
    csr.write_text(
        "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n"
    )
    return csr, mint_token(ca.home, WEB)


def not_pem(tmp_path, ca):
    csr = tmp_path / "text.csr"
    csr.write_text("hello")
    return csr, mint_token(ca.home, WEB)


def wrong_signature(tmp_path, ca):
    """A real openssl CSR whose signed content was changed afterwards (CN test -> tesu)."""
    _, csr = openssl_csr(tmp_path, "tampered")
    lines = csr.read_text().strip().splitlines()
    der = base64.b64decode("".join(lines[1:-1]))
    assert der.count(b"test") == 1
    der = der.replace(b"test", b"tesu")
    body = base64.encodebytes(der).decode()
    csr.write_text(f"{lines[0]}\n{body}{lines[-1]}\n")
    return csr, mint_token(ca.home, WEB)


def dsa_key(tmp_path, ca):
    params = tmp_path / "dsa.param"
    subprocess.run(
        [
            "openssl",
            "genpkey",
            "-genparam",
            "-algorithm",
            "DSA",
            "-pkeyopt",
            "dsa_paramgen_bits:1024",
            "-out",
            str(params),
        ],
        check=True,
        capture_output=True,
    )
    _, csr = openssl_csr(tmp_path, "dsa", "-newkey", f"dsa:{params}")
    return csr, mint_token(ca.home, WEB)


def small_rsa(tmp_path, ca):
    _, csr = openssl_csr(tmp_path, "rsa1024", "-newkey", "rsa:1024")
    return csr, mint_token(ca.home, WEB)


def p521(tmp_path, ca):
    _, csr = openssl_csr(tmp_path, "p521", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521")
    return csr, mint_token(ca.home, WEB)


def replayed_token(tmp_path, ca):
    token = mint_token(ca.home, WEB)
    _, first = openssl_csr(tmp_path, "first")
    status, _ = curl_enroll(ca, first, token)
    assert status == 200
    _, csr = openssl_csr(tmp_path, "second")
    return csr, token


def expired_token(tmp_path, ca):
    token = mint_token(ca.home, WEB, ttl=1)
    time.sleep(2.1)
    _, csr = openssl_csr(tmp_path, "late")
    return csr, token


def other_ca_token(tmp_path, ca):
    """A join token for the same trust domain, signed by another CA's key."""
    other = tmp_path / "other-ca"
    run_meshca("init", "--home", str(other))
    _, csr = openssl_csr(tmp_path, "other")
    return csr, mint_token(other, WEB)


def forged_alg_none(tmp_path, ca):
    """A token that claims a valid identity with `alg: none` and no signature."""

    def b64(d: bytes) -> str:
        return base64.urlsafe_b64encode(d).rstrip(b"=").decode()

    now = int(time.time())
    claims = (
        f'{{"iss":"meshca-join/cluster.local","aud":"meshca","sub":"{WEB}",'
        f'"iat":{now},"exp":{now + 600},"jti":"x"}}'
    )
    _, csr = openssl_csr(tmp_path, "none")
    return csr, b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(claims.encode()) + "."


def missing_credential(tmp_path, ca):
    _, csr = openssl_csr(tmp_path, "anon")
    return csr, None


def not_a_jwt(tmp_path, ca):
    _, csr = openssl_csr(tmp_path, "junk")
    return csr, "not-a-token"


CASES = {
    "garbage CSR": (garbage_csr, 400, "bad_csr", "could not be parsed"),
    "not PEM": (not_pem, 400, "bad_csr", "not a PEM certificate request"),
    "wrong CSR signature": (wrong_signature, 400, "bad_csr_signature", "signature does not verify"),
    "DSA key": (dsa_key, 400, "bad_key_type", "DSA"),
    "RSA 1024": (small_rsa, 400, "bad_key_type", "1024 bits is too small"),
    "EC P-521": (p521, 400, "bad_key_type", "secp521r1"),
    "replayed join token": (replayed_token, 401, "invalid_token", "already been used"),
    "expired join token": (expired_token, 401, "invalid_token", "expired"),
    "token signed by another key": (
        other_ca_token,
        401,
        "invalid_token",
        "signature does not verify",
    ),
    "alg none": (forged_alg_none, 401, "invalid_token", "algorithm is not accepted"),
    "missing credential": (missing_credential, 401, "missing_credential", "missing credential"),
    "not a JWT": (not_a_jwt, 401, "invalid_token", "not a valid JWT"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_and_issues_nothing(tmp_path, ca, case):
    make, status, code, detail = CASES[case]
    csr, token = make(tmp_path, ca)
    before = workload_certs(ca.home)
    got_status, doc = curl_enroll(ca, csr, token)
    assert (got_status, doc["error"]) == (status, code), doc
    assert detail in doc["detail"]
    assert workload_certs(ca.home) == before, "nothing may be issued"
    assert refusals(ca.home)[-1]["code"] == code
    if token:
        assert token not in ca.log, "a token must never reach the log"


def test_body_over_limit_is_413(tmp_path, ca):
    big = tmp_path / "big.json"
    big.write_text('{"csr": "' + "A" * (65 * 1024) + '"}')
    token = mint_token(ca.home, WEB)
    status, body, _ = curl(
        ca, "/v1/certificates", "-H", f"Authorization: Bearer {token}", "--data-binary", f"@{big}"
    )
    assert status == 413
    assert '"error": "too_large"' in body and "65536-byte limit" in body
    assert workload_certs(ca.home) == []
    assert refusals(ca.home)[-1]["code"] == "too_large"
    # The token was not consumed by the refused request.
    _, csr = openssl_csr(tmp_path, "after")
    assert curl_enroll(ca, csr, token)[0] == 200


def test_body_that_is_not_json(ca):
    token = mint_token(ca.home, WEB)
    status, body, _ = curl(
        ca, "/v1/certificates", "-H", f"Authorization: Bearer {token}", "--data-binary", "csr=abc"
    )
    assert status == 400 and '"error": "bad_json"' in body
    assert workload_certs(ca.home) == []


def test_bad_csr_does_not_consume_token(tmp_path, ca):
    """A refused request leaves the join token usable: the pod can retry with a good CSR."""
    token = mint_token(ca.home, WEB)
    _, bad = openssl_csr(tmp_path, "small", "-newkey", "rsa:1024")
    assert curl_enroll(ca, bad, token)[0] == 400
    _, good = openssl_csr(tmp_path, "good")
    status, doc = curl_enroll(ca, good, token)
    assert status == 200 and doc["spiffe_id"] == WEB
