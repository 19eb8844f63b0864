"""`kill -9` of a sidecar under load: it comes back with a new key and a new join token.

Four clients call backend through frontend's sidecar without pause. backend's
sidecar is killed with SIGKILL and started again on the same ports, first with the
join token it enrolled with (spent: it stays unready and says why, while the calls
keep getting clean 502/503 JSON errors from frontend's sidecar), then with a new
token written into its token file, as an operator (or the kubelet) does. It enrolls
with a key it has never used, and traffic resumes: every call made while backend's
sidecar was up, before the kill and after its return, is answered 200 by the app.
"""

from __future__ import annotations

import http.client
import json
import signal
import ssl
import threading
from pathlib import Path

import pytest
import yaml
from conftest import BACKEND, FRONTEND
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import curl_enroll, mint_token, openssl_csr, run_meshca, start_ca, workload_certs
from mesh import Proc, admin_get, hostport, proxy_get, sidecar_config, start_echo, start_sidecar
from rotation_rig import free_port, wait_for

TESTER = "spiffe://cluster.local/ns/tools/sa/tester"
CLIENTS = 4


class Load:
    """`CLIENTS` threads calling backend through frontend; each call notes the phase
    (`up`, `down`, `back`) when it started and when it ended, and its status."""

    def __init__(self, frontend: Proc) -> None:
        self.frontend = frontend
        self.phase = "up"
        self.calls: list[tuple[str, str, int, bytes]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _run(self) -> None:
        while not self._stop.is_set():
            start = self.phase
            try:
                status, body, _ = proxy_get(
                    self.frontend, "http://backend.default/load", timeout=20
                )
            except OSError as e:
                status, body = -1, repr(e).encode()
            self.calls.append((start, self.phase, status, body[:200]))

    def count(self, phase: str) -> int:
        return sum(1 for s, e, _, _ in self.calls if s == e == phase)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


@pytest.fixture
def env(tmp_path: Path):
    """CA; echo app; backend's sidecar on fixed ports; frontend's sidecar; a tester cert."""
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    procs: list = []
    env: dict = {"home": home, "procs": procs, "root": tmp_path}
    try:
        env["ca"] = ca = start_ca(home)
        procs.append(ca)
        app = start_echo()
        procs.append(app)
        cfg = sidecar_config(tmp_path, "backend", ca, BACKEND, app=hostport(app.urls["echo"]))
        doc = yaml.safe_load(cfg.read_text())
        for section in ("inbound", "admin", "health"):  # where peers and probes expect it
            doc[section]["listen"] = f"127.0.0.1:{free_port()}"
        cfg.write_text(yaml.safe_dump(doc))
        env["backend_config"] = cfg
        env["backend"] = start_sidecar(cfg)
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
        code, enrolled = curl_enroll(ca, csr, mint_token(home, TESTER))
        assert code == 200, enrolled
        chain = tmp_path / "tester.pem"
        chain.write_text(enrolled["certificate_chain"])
        env["tester"] = (chain, key, ca.bundle)
        yield env
    finally:
        for p in reversed(procs):
            if p.proc.poll() is None:
                p.stop()


def backend_key(env: dict) -> bytes:
    """The public key backend's inbound port presents, seen by a client in an mTLS handshake."""
    chain, key, bundle = env["tester"]
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(chain), str(key))
    host, port = hostport(env["backend"].urls["inbound"]).split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=20)
    try:
        conn.request("GET", "/whoami")
        assert conn.getresponse().status == 200
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)
    finally:
        conn.close()
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_sidecar_killed_under_load_reenrolls_and_traffic_resumes(env):
    token_file = env["root"] / "backend" / "token"
    old_token = token_file.read_text()
    old_key = backend_key(env)
    with Load(env["frontend"]) as load:
        wait_for("calls before the kill", lambda: load.count("up") >= 20, 15, [env["frontend"]])
        load.phase = "down"
        env["backend"].proc.send_signal(signal.SIGKILL)
        env["backend"].proc.wait(timeout=10)
        env["procs"].remove(env["backend"])

        # Restarted as it was: its join token is spent, so it is not ready and says why.
        backend = start_sidecar(env["backend_config"], wait_ready=False)
        env["procs"].append(backend)
        env["backend"] = backend

        def refused() -> bool:
            code, doc = admin_get(backend, "/status", timeout=5)
            return "already been used" in (doc.get("last_error") or "")

        wait_for("the spent token to be refused", refused, 15, [backend])
        assert admin_get(backend, "/ready")[0] == 503
        assert token_file.read_text() == old_token
        token_file.write_text(mint_token(env["home"], BACKEND) + "\n")
        wait_for("a new enrollment", lambda: admin_get(backend, "/ready")[0] == 200, 15, [backend])
        load.phase = "back"
        wait_for("calls after the return", lambda: load.count("back") >= 20, 15, [backend])

    for start, end, status, body in load.calls:
        if start == end and start in ("up", "back"):
            assert status == 200, (start, status, body)
        else:  # around the outage: a clean error from frontend's sidecar, or an answer
            assert status in (200, 502, 503), (start, end, status, body)
            if status != 200:
                assert json.loads(body)["error"], body
    assert any(status != 200 for _, _, status, _ in load.calls), "the kill went unnoticed"

    new_key = backend_key(env)
    assert new_key != old_key
    certs = [c for c in workload_certs(env["home"]) if c["spiffe_id"] == BACKEND]
    assert len(certs) == 2  # the first enrollment and the one after the kill
