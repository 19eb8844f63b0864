"""The CA down while an operator forces a renewal, with hour-long leaves (realistic ratios).

The sibling of test_fault_ca_down_short_leaves.py, without shrunk lifetimes: leaves
live an hour, so nothing renews unless asked. With the CA stopped, `sidecar rotate`
(as run with kubectl exec) fails with the reason and a non-zero exit, the admin
endpoint's POST /rotate answers 502, `/status` says `renewal_failing` with the
error, and the sidecar keeps serving on its current certificate: readiness stays
200, calls through both sidecars and fresh mTLS handshakes from another client
succeed and see the same serial. Once the CA is back on the same port, the next
`sidecar rotate` prints a new serial, which the ledger records and peers then see.
"""

from __future__ import annotations

import http.client
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BACKEND, FRONTEND
from cryptography import x509
from helpers import curl_enroll, mint_token, openssl_csr, run_meshca, start_ca, workload_certs
from mesh import Proc, admin_get, hostport, proxy_get, sidecar_config, start_echo, start_sidecar
from rotation_rig import free_port

LEAF_TTL = "3600"
TESTER = "spiffe://cluster.local/ns/tools/sa/tester"


@pytest.fixture
def env(tmp_path: Path):
    """A CA on a fixed port with hour-long leaves; backend (echo) and frontend sidecars;
    a tester's client certificate for direct mTLS calls to backend's inbound port."""
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    ca_args = ("--listen", f"127.0.0.1:{free_port()}", "--cert-ttl", LEAF_TTL)
    procs: list = []
    env: dict = {"home": home, "ca_args": ca_args, "procs": procs}
    try:
        env["ca"] = ca = start_ca(home, *ca_args)
        procs.append(ca)
        app = start_echo()
        procs.append(app)
        env["backend"] = start_sidecar(
            sidecar_config(tmp_path, "backend", ca, BACKEND, app=hostport(app.urls["echo"]))
        )
        procs.append(env["backend"])
        env["frontend"] = start_sidecar(
            sidecar_config(
                tmp_path,
                "frontend",
                ca,
                FRONTEND,
                services={
                    "backend.default": {
                        "endpoints": [hostport(env["backend"].urls["inbound"])],
                        "identity": BACKEND,
                    }
                },
            )
        )
        procs.append(env["frontend"])
        key, csr = openssl_csr(tmp_path, "tester")
        code, doc = curl_enroll(ca, csr, mint_token(home, TESTER))
        assert code == 200, doc
        chain = tmp_path / "tester.pem"
        chain.write_text(doc["certificate_chain"])
        env["tester"] = (chain, key, ca.bundle)
        yield env
    finally:
        for p in reversed(procs):
            p.stop()


def sidecar_rotate(p: Proc) -> subprocess.CompletedProcess:
    """`sidecar rotate`, as `kubectl exec POD -c sidecar -- sidecar rotate` runs it."""
    admin = hostport(p.urls["admin"])
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "rotate", "--admin", admin],
        capture_output=True,
        text=True,
        timeout=60,
    )


def serial(p: Proc) -> int:
    """The serial of the sidecar's current certificate, as a number."""
    code, doc = admin_get(p, "/identity")
    assert code == 200, doc
    return int(doc["serial"], 16)


def calls_succeed(env: dict, n: int = 10) -> None:
    """Calls through both sidecars, then direct calls to backend's inbound, each on a new
    connection (a new handshake); every one answered 200."""
    for i in range(n):
        status, body, _ = proxy_get(env["frontend"], f"http://backend.default/call/{i}")
        assert status == 200, body
    for i in range(n):
        status, _ = direct(env, f"/direct/{i}")
        assert status == 200


def direct(env: dict, path: str) -> tuple[int, int]:
    """GET `path` on backend's inbound port with the tester's certificate, on a new
    connection; (status, serial of the certificate backend presented)."""
    chain, key, bundle = env["tester"]
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(chain), str(key))
    host, port = hostport(env["backend"].urls["inbound"]).split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=20)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        der = conn.sock.getpeercert(binary_form=True) if conn.sock else None
        assert der is not None
        return resp.status, x509.load_der_x509_certificate(der).serial_number
    finally:
        conn.close()


def test_forced_renewal_while_ca_down_keeps_serving(env):
    backend, frontend = env["backend"], env["frontend"]
    calls_succeed(env)
    before = serial(backend)
    assert direct(env, "/before")[1] == before

    env["ca"].stop()
    env["procs"].remove(env["ca"])

    # The operator forces a renewal: it fails, says why, and changes nothing.
    done = sidecar_rotate(backend)
    assert done.returncode == 1 and "sidecar rotate:" in done.stderr, done
    code, doc = admin_get(backend, "/rotate", "POST")
    assert code == 502 and doc["error"] == "rotation_failed" and doc["detail"], doc
    code, st = admin_get(backend, "/status")
    assert code == 200 and st["state"] == "renewal_failing" and st["last_error"], st
    assert admin_get(backend, "/ready")[0] == 200
    assert serial(backend) == before
    calls_succeed(env)
    assert direct(env, "/while-down")[1] == before  # new handshakes: the current certificate

    # The CA comes back on the same port, from the same home: the next rotate succeeds.
    env["ca"] = ca = start_ca(env["home"], *env["ca_args"])
    env["procs"].insert(0, ca)
    done = sidecar_rotate(backend)
    assert done.returncode == 0, f"{done.stderr}\n{backend.stderr[-3000:]}"
    renewed = int(done.stdout.strip(), 16)
    assert renewed != before and renewed == serial(backend)
    code, st = admin_get(backend, "/status")
    assert st["state"] == "ready" and st["last_error"] is None, st
    assert renewed in {int(c["serial"], 16) for c in workload_certs(env["home"])}
    calls_succeed(env)
    assert direct(env, "/after")[1] == renewed
    assert admin_get(frontend, "/status")[1]["state"] == "ready"
