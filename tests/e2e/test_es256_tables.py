"""A JWT inbound verifies ES256 tokens from its key's table (meshca.p256) once the key
has verified one, answers exactly as before (200 for every new valid token, 401 for a
forged one, also after the table), and gives back the pages of cryptography's ECDSA
after the table is built: after a renewal has released them again, new tokens do not map
them back. With the tables off, every token goes through cryptography, which does (the
control: the measure sees the difference)."""

from __future__ import annotations

import base64
import json
import time

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from filepages import library_kib, releases, settles
from helpers import tail
from mesh import admin_get, hostport
from tlsclient import CLIENT, client_context, connect, read_response, start_backend

ISSUER = "https://issuer.test"
# cryptography's ECDSA verification maps back about 2.3 MiB of its library here (the
# control below); a table's verifications map back next to nothing of it.
TABLE_SLACK_KIB = 192
CONTROL_MIN_KIB = 2 * TABLE_SLACK_KIB


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Issuer:
    """One ES256 key, its JWKS, and a new token per call."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.n = 0

    def jwks(self) -> dict:
        nums = self.key.public_key().public_numbers()
        x, y = (b64(v.to_bytes(32, "big")) for v in (nums.x, nums.y))
        return {"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": x, "y": y}]}

    def token(self, forged: bool = False) -> str:
        self.n += 1
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "backend", "sub": f"user-{self.n}", "iat": now}
        claims |= {"exp": now + 3600, "jti": f"t-{self.n}"}
        head = b64(json.dumps({"alg": "ES256", "kid": "k1"}).encode())
        signing_input = f"{head}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        if forged:
            s = s ^ 1
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def start_jwt_backend(tmp_path, ca, issuer: Issuer):
    folder = tmp_path / "backend"
    folder.mkdir(exist_ok=True)
    (folder / "jwks.json").write_text(json.dumps(issuer.jwks()))
    rules = [
        {"name": "t", "action": "ALLOW", "from": {"request_principals": [f"{ISSUER}/*"]}},
        # the client's own calls to /warm need no token: what forwarding a request runs
        {
            "name": "w",
            "action": "ALLOW",
            "from": {"principals": [CLIENT]},
            "to": {"paths": ["/warm"]},
        },
    ]
    (folder / "policy.yaml").write_text(yaml.safe_dump({"rules": rules}))
    one = dict(issuer=ISSUER, audiences=["backend"], jwks_file="jwks.json", algorithms=["ES256"])
    jwt = {"jwt": {"issuers": [one]}, "policy": {"file": "policy.yaml"}}
    return start_backend(tmp_path, ca, drain=1, log_level="DEBUG", extra=jwt)


def ask(s, token: str, i: int) -> int:
    s.sendall(
        f"GET /t/{i} HTTP/1.1\r\nHost: backend\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head, body = read_response(s)
    status = int(head.split(b" ", 2)[1])
    if status == 200:
        assert json.loads(body)["path"] == f"/t/{i}"
    return status


def wait_settled(sidecar, more_than: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while releases(sidecar) <= more_than:
        assert time.monotonic() < deadline, (
            f"no release of file pages within {timeout} s\n{settles(sidecar)}\n{tail(sidecar.err)}"
        )
        time.sleep(0.05)


BUILT = "meshca.p256: a P-256 table is built"


def wait_table_released(sidecar, timeout: float = 10) -> None:
    """The key's table is built, and the sidecar released its file pages after that."""
    deadline = time.monotonic() + timeout
    while releases(sidecar.stderr.partition(BUILT)[2]) < 1:
        assert time.monotonic() < deadline, (
            f"no table built and released within {timeout} s\n{settles(sidecar)}\n"
            f"{tail(sidecar.err)}"
        )
        time.sleep(0.05)


@pytest.mark.parametrize("tables", ["on", "off"])
def test_es256_tokens_from_the_table_and_its_memory(ca, tmp_path, monkeypatch, tables):
    if tables == "off":
        monkeypatch.setenv("MESHCA_P256_TABLES", "0")
    issuer = Issuer()
    ctx = client_context(ca, tmp_path)
    app, sidecar = start_jwt_backend(tmp_path, ca, issuer)
    try:
        pid = sidecar.proc.pid
        s = connect(ctx, hostport(sidecar.urls["inbound"]))
        try:
            time.sleep(1)  # the enrollment's release and the first bundle poll's are done
            before = releases(sidecar)
            for i in range(3):  # a key a token merely names gets no table: no release
                assert ask(s, issuer.token(forged=True), i) == 401
            time.sleep(0.5)
            assert releases(sidecar) == before, settles(sidecar)
            for i in range(20):  # verified through cryptography; the first starts the build
                assert ask(s, issuer.token(), i) == 200
            if tables == "on":
                wait_table_released(sidecar)
            else:
                time.sleep(0.5)
                assert BUILT not in sidecar.stderr
                assert releases(sidecar) == before, settles(sidecar)
            # A renewal releases the pages again, in both cases: what comes back after it
            # is what the verifications from then on run.
            before = releases(sidecar)
            status, doc = admin_get(sidecar, "/rotate", method="POST")
            assert status == 200, doc
            wait_settled(sidecar, before)
            time.sleep(0.2)
            for _ in range(5):  # what forwarding any request runs after a renewal, no token
                s.sendall(b"GET /warm HTTP/1.1\r\nHost: backend\r\n\r\n")
                assert read_response(s)[0].startswith(b"HTTP/1.1 200 ")
                assert ask(s, "", 0) == 401  # an empty token
            start = library_kib(pid)[0]
            for i in range(200):
                assert ask(s, issuer.token(), i) == 200
                if i % 50 == 0:
                    assert ask(s, issuer.token(forged=True), i) == 401
            end = library_kib(pid)[0]
        finally:
            s.close()
        figures = f"cryptography's library resident: {start} -> {end} KiB (tables {tables})"
        print(figures)
        if tables == "on":
            assert end - start <= TABLE_SLACK_KIB, f"{figures}\n{settles(sidecar)}"
        else:
            assert end - start >= CONTROL_MIN_KIB, f"{figures}\n{settles(sidecar)}"
    finally:
        sidecar.stop()
        app.stop()
