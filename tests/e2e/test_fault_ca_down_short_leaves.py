"""The CA down for longer than half a leaf's lifetime: no request fails, renewal resumes.

Leaves live 12 s, so a sidecar renews every ~6 s. Both sidecars renew right
before the CA stops (so each holds a full lifetime), the CA stays down for more
than half a lifetime while calls flow through both sidecars, and it comes back
on the same port and home. Meanwhile the sidecars report `renewal_failing` and
keep serving on their current certificates; once the CA is back they renew
(new serials, recorded in the ledger) and the new certificates are the ones
peers see. Not one call fails. The sibling with hour-long leaves is
test_fault_ca_down_realistic.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import BACKEND, FRONTEND
from helpers import CAProcess, run_meshca, start_ca, workload_certs
from mesh import Proc, admin_get, hostport, proxy_get, sidecar_config, start_echo, start_sidecar
from rotation_rig import free_port, wait_for

LEAF_TTL = 12.0


class Traffic:
    """Calls frontend -> backend in a background thread until stopped; keeps every failure."""

    def __init__(self, frontend: Proc) -> None:
        self.frontend = frontend
        self.calls = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.calls += 1
            try:
                status, body, _ = proxy_get(
                    self.frontend, f"http://backend.default/call/{self.calls}", timeout=10
                )
            except OSError as e:
                self.failed.append(f"call {self.calls}: {e!r}")
                continue
            if status != 200:
                self.failed.append(f"call {self.calls}: {status} {body[:200]!r}")
            self._stop.wait(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)


def status(p: Proc) -> dict:
    code, doc = admin_get(p, "/status", timeout=10)
    assert code == 200, doc
    return doc


def serial(p: Proc) -> str:
    code, doc = admin_get(p, "/identity", timeout=10)
    assert code == 200, doc
    return doc["serial"]


@pytest.fixture
def mesh(tmp_path: Path):
    """A CA on a fixed port with 12 s leaves; backend (echo app) and frontend sidecars."""
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    port = free_port()
    ca_args = ("--listen", f"127.0.0.1:{port}", "--cert-ttl", str(LEAF_TTL))
    procs: list = []
    state: dict = {"home": home, "ca_args": ca_args, "procs": procs, "root": tmp_path}
    try:
        state["ca"] = start_ca(home, *ca_args)
        procs.append(state["ca"])
        app = start_echo()
        procs.append(app)
        fast_retry = {"retry_max": 1}  # back off at most 1 s, so the CA's return is seen soon
        state["backend"] = start_sidecar(
            sidecar_config(
                tmp_path,
                "backend",
                state["ca"],
                BACKEND,
                app=hostport(app.urls["echo"]),
                ca_extra=fast_retry,
            )
        )
        procs.append(state["backend"])
        state["frontend"] = start_sidecar(
            sidecar_config(
                tmp_path,
                "frontend",
                state["ca"],
                FRONTEND,
                ca_extra=fast_retry,
                services={
                    "backend.default": {
                        "endpoints": [hostport(state["backend"].urls["inbound"])],
                        "identity": BACKEND,
                    }
                },
            )
        )
        procs.append(state["frontend"])
        yield state
    finally:
        for p in reversed(procs):
            p.stop()


def test_ca_down_past_half_life_fails_no_call(mesh):
    backend, frontend = mesh["backend"], mesh["frontend"]
    sidecars = {"backend": backend, "frontend": frontend}
    with Traffic(frontend) as traffic:
        # Each sidecar renews on its own at about half-life while the CA is up.
        for name, p in sidecars.items():
            wait_for(f"{name} to renew once", lambda p=p: status(p)["renewals"] >= 2, 15, [p])
        # A fresh certificate on both, then the CA goes away (SIGTERM, as a node drain does).
        for name, p in sidecars.items():
            code, doc = admin_get(p, "/rotate", "POST")
            assert code == 200, f"{name}: {doc}"
        before = {name: serial(p) for name, p in sidecars.items()}
        ca: CAProcess = mesh["ca"]
        ca.stop()
        mesh["procs"].remove(ca)
        down_since = time.monotonic()
        for name, p in sidecars.items():
            wait_for(
                f"{name} to report renewal_failing",
                lambda p=p: status(p)["state"] == "renewal_failing",
                LEAF_TTL,
                [p],
            )
        # Down for more than half a lifetime: every sidecar's renewal time has passed.
        time.sleep(max(0.0, LEAF_TTL / 2 + 1 - (time.monotonic() - down_since)))
        assert {name: serial(p) for name, p in sidecars.items()} == before
        calls_while_down = traffic.calls

        # The CA comes back on the same port, from the same home.
        ca = start_ca(mesh["home"], *mesh["ca_args"])
        mesh["procs"].insert(0, ca)
        for name, p in sidecars.items():
            wait_for(
                f"{name} to renew after the CA came back",
                lambda p=p, name=name: status(p)["state"] == "ready" and serial(p) != before[name],
                LEAF_TTL / 2,
                [p, ca],
            )
        after = {name: serial(p) for name, p in sidecars.items()}
        calls_after = traffic.calls
        # Traffic keeps flowing on the renewed certificates too.
        wait_for("more calls after the renewal", lambda: traffic.calls > calls_after + 20, 15)
    assert traffic.failed == [], traffic.failed[:10]
    assert calls_while_down > 0 and traffic.calls > calls_after

    # What the sidecars hold now is what the ledger recorded, and what peers see.
    recorded = {c["serial"] for c in workload_certs(mesh["home"])}
    assert set(after.values()) <= recorded
    held = serial(backend)  # it may renew once more (every ~6 s) while we look
    code, seen = admin_get(
        frontend, f"/check?target={hostport(backend.urls['inbound'])}&expect={BACKEND}", "POST"
    )
    assert code == 200 and seen["identity_ok"] and seen["chain_valid"], seen
    assert seen["serial"] in {held, serial(backend)}
