"""A sidecar with no HTTP/2 connection never loads the HTTP/2 engines (`h2`, `hpack`,
`hyperframe`), and none loads pyjwt, not even to read a JWKS and verify a token: what an
idle sidecar imports is most of its resident memory (docs/sidecar.md, "Memory"). The
HTTP/2 engines load at the first HTTP/2 connection, and are the real ones. Loading its
certificate and key does not bring in tempfile (with shutil, bz2 and lzma: 0.6 MiB
resident): they go through memory files.

Checked in a fresh interpreter (this one has imported everything the other tests use):
it imports what `sidecar run` imports before serving (`sidecar.cli` and the imports at
the top of its `run()`) and builds an inbound and an outbound router, as `run()` does.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("h2", "hpack", "hyperframe", "jwt", "sidecar.engines.h2.upstream")
UNUSED = ("tempfile", "shutil", "bz2", "lzma")  # what the key files once needed
# What importing pyjwt brought with it (its JWKS client): 1.2 MiB that a JWT sidecar held.
HTTP_CLIENT = ("urllib.request", "http.client", "email.message", "email.parser")


def run_imports() -> list[str]:
    """The modules `sidecar.cli.run()` imports unconditionally, at the top of its body."""
    tree = ast.parse((ROOT / "sidecar" / "cli.py").read_text())
    run = next(n for n in tree.body if isinstance(n, ast.AsyncFunctionDef) and n.name == "run")
    found = []
    for node in run.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


SCRIPT = """
import importlib, json, sys
sys.path.insert(0, {tests!r})
for name in {modules!r}:
    importlib.import_module(name)
from routerfakes import Store
from meshca.config import parse_listen
from sidecar.config import InboundConfig, parse_config
from sidecar.policy.holder import PolicyHolder
from sidecar.routing.inbound import InboundRouter
from sidecar.routing.outbound import OutboundRouter

def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in {optional!r}
                  or m in {optional!r})

import datetime, ssl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from meshca import tlsutil
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
tlsutil.load_chain(
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
    cert.public_bytes(serialization.Encoding.PEM),
    key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                      serialization.NoEncryption()),
)
import os
try:
    os.close(os.memfd_create("probe"))
    memfd = True
except (AttributeError, OSError):  # the fallback (a private directory) needs tempfile
    memfd = False

cfg = InboundConfig(parse_listen("127.0.0.1:0"), parse_listen("127.0.0.1:5000"))
InboundRouter(cfg, Store(), policy=PolicyHolder(None))
doc = {{
    "ca": {{"url": "https://ca:8443", "bundle": "ca-root.pem", "token_file": "token"}},
    "outbound": {{"listen": "127.0.0.1:0", "services": {{"api.default": {{
        "endpoints": ["127.0.0.1:1"], "identity": "spiffe://cluster.local/ns/default/sa/api"}}}}}},
}}
from pathlib import Path
OutboundRouter(parse_config(doc, Path({tmp!r})).outbound, Store())
idle = loaded()

from sidecar.engines.h2 import lazy, upstream
conn = lazy.H2Upstream(None, b"http")  # what the first HTTP/2 connection to an app makes
from sidecar.heap import HeapKeeper
HeapKeeper(trim=lambda pad: 0)

# A JWT issuer with a JWKS file: its keys are read and a token verified, as the inbound does.
import base64, time
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from meshca.jwks import FileJwks
from sidecar.policy.authn import Authenticator, IssuerRule
def b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
nums = key.public_key().public_numbers()
jwks = Path({tmp!r}).parent / "jwks.json"
jwks.write_text(json.dumps({{"keys": [{{"kty": "EC", "crv": "P-256", "kid": "k1",
    "x": b64(nums.x.to_bytes(32, "big")), "y": b64(nums.y.to_bytes(32, "big"))}}]}}))
head = b64(json.dumps({{"alg": "ES256", "kid": "k1"}}).encode())
body = b64(json.dumps({{"iss": "https://issuer.test", "exp": time.time() + 60}}).encode())
r, s = decode_dss_signature(key.sign((head + "." + body).encode(), ec.ECDSA(hashes.SHA256())))
token = head + "." + body + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
auth = Authenticator([IssuerRule("https://issuer.test", (), FileJwks(jwks))])
verified = auth.verify(token).claims["iss"] == "https://issuer.test"
http_client = sorted(m for m in {http_client!r} if m in sys.modules)

unused = sorted(m for m in {unused!r} if m in sys.modules)
print(json.dumps({{"idle": idle, "real": type(conn) is upstream.H2Upstream,
                  "after": loaded(), "unused": unused, "memfd": memfd,
                  "verified": verified, "http_client": http_client}}))
"""


def test_no_http2_engine_until_used_and_no_pyjwt(tmp_path):
    (tmp_path / "ca-root.pem").write_text("x")
    (tmp_path / "token").write_text("x")
    modules = ["sidecar.cli", *run_imports()]
    assert "sidecar.routing.inbound" in modules  # (what run() builds is imported)
    script = SCRIPT.format(
        tests=str(ROOT / "tests"),
        modules=modules,
        optional=OPTIONAL,
        unused=UNUSED,
        http_client=HTTP_CLIENT,
        tmp=str(tmp_path / "sidecar.yaml"),
    )
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["idle"] == []
    assert got["real"] is True
    assert "h2" in got["after"] and "sidecar.engines.h2.upstream" in got["after"]
    assert got["verified"] is True
    assert "jwt" not in got["after"]  # not for reading the JWKS or verifying the token
    assert got["http_client"] == []
    if not got["memfd"]:
        pytest.skip("memfd_create is refused here: loading a key falls back to tempfile")
    assert got["unused"] == []
