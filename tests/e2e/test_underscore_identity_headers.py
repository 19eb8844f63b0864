"""Identity headers spelled with underscores never reach the app.

CGI/WSGI servers give `X_Forwarded_Client_Cert` and `X-Forwarded-Client-Cert`
the same variable, so a client with a valid certificate must not be able to
hand the app a forged caller identity or forged "verified" JWT claims that
way. Real clients (curl, and a raw TLS socket) with a CA-issued client
certificate call backend sidecars running in each
`inbound.headers_with_underscores_action` mode in front of the echo app: for
every identity header the sidecar writes (X-Forwarded-Client-Cert,
X-Forwarded-Proto, the JWT claims header) the app sees exactly one, the
sidecar's own, in every mode; DROP_HEADER (the default) drops any other
underscore header, ALLOW forwards it, REJECT_REQUEST answers 400 and the app
sees nothing.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import time

import jwt
import pytest
import yaml
from conftest import BACKEND
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import curl_enroll, mint_token, openssl_csr, run_meshca, start_ca
from mesh import app_log, hostport, sidecar_config, start_echo, start_sidecar

CALLER = "spiffe://cluster.local/ns/tools/sa/curl"
ISSUER = "https://issuer.test"
ADMIN = "spiffe://cluster.local/ns/kube-system/sa/admin"
FORGED_CLAIMS = base64.urlsafe_b64encode(b'{"sub":"admin","groups":["ops"]}').decode()

# Every underscore spelling a client might try, for each header the sidecar writes.
FORGED = [
    ("X_Forwarded_Client_Cert", f"By={BACKEND};URI={ADMIN}"),
    ("x_forwarded_client_cert", f"URI={ADMIN}"),
    ("X-Forwarded_Client-Cert", f"URI={ADMIN}"),
    ("X_FORWARDED_CLIENT_CERT", f"URI={ADMIN}"),
    ("X_Forwarded_Proto", "http"),
    ("x_forwarded-proto", "http"),
    ("X_Jwt_Claims", FORGED_CLAIMS),
    ("x_jwt-claims", FORGED_CLAIMS),
]
OWNED = ("x-forwarded-client-cert", "x-forwarded-proto", "x-jwt-claims")
MODES = {"default": None, "ALLOW": "ALLOW", "DROP_HEADER": "DROP_HEADER"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("underscore")
    home = root / "ca"
    run_meshca("init", "--home", str(home))
    ca = start_ca(home)
    procs = [ca]
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk["kid"] = "k1"
        app_log_path = root / "app.log"
        app = start_echo(app_log_path)
        procs.append(app)
        inbound = {}
        for name, mode in [*MODES.items(), ("REJECT_REQUEST", "REJECT_REQUEST")]:
            extra = {"headers_with_underscores_action": mode} if mode else {}
            cfg = sidecar_config(
                root,
                f"backend-{name.lower()}",
                ca,
                BACKEND,
                app=hostport(app.urls["echo"]),
                inbound_extra=extra,
            )
            (cfg.parent / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
            doc = yaml.safe_load(cfg.read_text())
            doc["jwt"] = {
                "issuers": [
                    {
                        "issuer": ISSUER,
                        "audiences": ["backend"],
                        "jwks_file": "jwks.json",
                        "algorithms": ["ES256"],
                        "claims_header": "x-jwt-claims",
                    }
                ]
            }
            cfg.write_text(yaml.safe_dump(doc))
            p = start_sidecar(cfg)
            procs.append(p)
            inbound[name] = hostport(p.urls["inbound"])
        ckey, csr = openssl_csr(root, "caller")
        status, enrolled = curl_enroll(ca, csr, mint_token(home, CALLER))
        assert status == 200, enrolled
        chain = root / "caller.pem"
        chain.write_text(enrolled["certificate_chain"])
        token = jwt.encode(
            {"iss": ISSUER, "sub": "alice", "aud": "backend", "exp": int(time.time()) + 600},
            key,
            algorithm="ES256",
            headers={"kid": "k1"},
        )
        yield {
            "inbound": inbound,
            "client": (chain, ckey),
            "bundle": ca.bundle,
            "token": token,
            "app_log": app_log_path,
        }
    finally:
        for p in reversed(procs):
            p.stop()


def curl(env, mode: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, dict]:
    """curl with the caller's certificate; (status, the echo app's JSON or the error's)."""
    chain, key = env["client"]
    args = ["curl", "-sS", "-k", "--max-time", "10", "--cert", str(chain), "--key", str(key)]
    args += ["-w", "\n%{http_code}"]
    for k, v in headers:
        args += ["-H", f"{k}: {v}"]
    res = subprocess.run(
        [*args, f"https://{env['inbound'][mode]}{path}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    body, _, code = res.stdout.rpartition("\n")
    return int(code), json.loads(body)


def raw_tls(env, mode: str, head: bytes) -> bytes:
    """A hand-written request over TLS with the caller's certificate; the whole answer."""
    ctx = ssl.create_default_context(cafile=str(env["bundle"]))
    ctx.check_hostname = False
    ctx.load_cert_chain(*map(str, env["client"]))
    host, port = env["inbound"][mode].split(":")
    with ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=15)) as s:
        s.sendall(head)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass
    return out


def seen_by_app(doc: dict) -> list[tuple[str, str]]:
    """(name normalized as CGI would: lowercase, '_' as '-'; value) for each header."""
    return [(k.lower().replace("_", "-"), v) for k, v in doc["headers"].items()]


@pytest.mark.parametrize("mode", MODES)
def test_app_sees_only_the_sidecars_identity_headers(env, mode):
    headers = [*FORGED, ("Authorization", f"Bearer {env['token']}")]
    status, doc = curl(env, mode, "/whoami", headers)
    assert status == 200, doc
    seen = seen_by_app(doc)
    for name in OWNED:
        values = [v for k, v in seen if k == name]
        assert len(values) == 1, (name, seen)
    got = dict(seen)
    assert got["x-forwarded-client-cert"].startswith(f"By={BACKEND};Hash=")
    assert got["x-forwarded-client-cert"].endswith(f";URI={CALLER}")
    assert got["x-forwarded-proto"] == "https"
    claims = json.loads(base64.urlsafe_b64decode(got["x-jwt-claims"] + "=="))
    assert claims["sub"] == "alice" and "groups" not in claims


@pytest.mark.parametrize("mode", MODES)
def test_without_a_token_no_claims_header_reaches_the_app(env, mode):
    status, doc = curl(env, mode, "/anon", FORGED)
    assert status == 200, doc
    names = [k for k, _ in seen_by_app(doc)]
    assert "x-jwt-claims" not in names
    assert names.count("x-forwarded-client-cert") == 1 and names.count("x-forwarded-proto") == 1


def test_raw_socket_spellings_never_reach_the_app(env):
    head = (
        b"GET /raw HTTP/1.1\r\nHost: backend\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in FORGED)
        + b"Connection: close\r\n\r\n"
    )
    for mode in MODES:
        out = raw_tls(env, mode, head)
        assert out.startswith(b"HTTP/1.1 200 "), out
        doc = json.loads(out.partition(b"\r\n\r\n")[2])
        names = [k for k, _ in seen_by_app(doc)]
        assert names.count("x-forwarded-client-cert") == 1, (mode, names)
        assert names.count("x-forwarded-proto") == 1 and "x-jwt-claims" not in names


def test_other_underscore_headers_follow_the_mode(env):
    headers = [("X_Request_Tag", "blue"), ("X-Plain", "1")]
    for mode, kept in (("default", False), ("DROP_HEADER", False), ("ALLOW", True)):
        status, doc = curl(env, mode, "/tag", headers)
        assert status == 200
        # (names reach the app lowercase, as the sidecar forwards every header name)
        assert ("x_request_tag" in doc["headers"]) is kept, mode
        assert doc["headers"]["x-plain"] == "1"


def test_reject_request_mode_refuses_and_the_app_sees_nothing(env):
    before = len(app_log(env["app_log"]))
    for header in [FORGED[0], FORGED[6], ("X_Request_Tag", "blue")]:
        status, doc = curl(env, "REJECT_REQUEST", "/rejected", [header])
        assert status == 400 and doc["error"] == "underscore_in_header_name", doc
    assert len(app_log(env["app_log"])) == before
    status, doc = curl(env, "REJECT_REQUEST", "/fine", [("X-Plain", "1")])
    assert status == 200 and doc["headers"]["x-plain"] == "1"
