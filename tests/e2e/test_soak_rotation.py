"""Soak: traffic flows through two sidecars while leaves renew, the intermediate rotates and the
root is prepared, activated and retired; no request fails and no connection drops.

Lifetimes and waits are short (4 s leaves, 3 s propagation, 6 s retire) and a
"cron" runs `meshca rotate` every half second, as the CronJob would each hour.
At the end every certificate in use chains only to the new root.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
import threading
import time

from conftest import BACKEND, Mesh
from cryptography import x509
from cryptography.x509 import verification as xv
from mesh import admin_get, hostport

CA_ARGS = ("--cert-ttl", "4", "--rate", "1000", "--burst", "1000", "--reload-interval", "0.3")
WAITS = ("--propagation-wait", "3", "--retire-wait", "6")


def rotate(home, *args):
    out = subprocess.run(
        [sys.executable, "-m", "meshca", "rotate", "--home", str(home), "--json", *WAITS, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_rotation_under_traffic(tmp_path):
    mesh = Mesh(tmp_path, ca_args=CA_ARGS, ca_extra={"bundle_poll": 0.3, "retry_max": 1})
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0, "errors": []}
    serials = {"backend": set(), "frontend": set()}

    def traffic():
        host, port = hostport(mesh.frontend.urls["outbound"]).split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)  # one connection, kept
        n = 0
        while not stop.is_set():
            n += 1
            try:
                conn.request("GET", f"http://backend.default/soak/{n}")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    counts["errors"].append(resp.status)
            except (OSError, http.client.HTTPException) as e:
                counts["failed"] += 1
                counts["errors"].append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
            time.sleep(0.005)
        conn.close()

    def fresh_connections():
        """New client connections now and then: new handshakes through the whole chain."""
        host, port = hostport(mesh.frontend.urls["outbound"]).split(":")
        while not stop.is_set():
            try:
                c = http.client.HTTPConnection(host, int(port), timeout=10)
                c.request("GET", "http://backend.default/fresh", headers={"Connection": "close"})
                r = c.getresponse()
                r.read()
                c.close()
                if r.status != 200:
                    counts["failed"] += 1
                    counts["errors"].append(f"fresh {r.status}")
                else:
                    counts["ok"] += 1
            except (OSError, http.client.HTTPException) as e:
                counts["failed"] += 1
                counts["errors"].append(f"fresh {e!r}")
            for name in serials:
                status, doc = admin_get(getattr(mesh, name), "/identity")
                if status == 200:
                    serials[name].add(doc["serial"])
            time.sleep(0.2)

    threads = [threading.Thread(target=traffic), threading.Thread(target=fresh_connections)]
    try:
        old_root = json.loads(
            subprocess.run(
                [sys.executable, "-m", "meshca", "status", "--home", str(mesh.ca.home), "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["roots"][0]["sha256"]
        for t in threads:
            t.start()
        actions = []
        start = time.monotonic()
        forced = started = False
        while time.monotonic() - start < 45:
            elapsed = time.monotonic() - start
            args = []
            if not forced and elapsed > 2:
                args, forced = ["--force-intermediate"], True
            elif forced and not started and elapsed > 4:
                args, started = ["--start-root-rotation"], True
            res = rotate(mesh.ca.home, *args)
            if res["action"] != "none":
                actions.append(res["action"])
            if "retire_root" in actions and time.monotonic() - start > 8 + 12:
                break
            time.sleep(0.5)
        time.sleep(5)  # a few more renewals after retirement
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        try:
            final = final_checks(mesh, old_root)
        finally:
            mesh.stop()
    print("SOAK", actions, counts["ok"], counts["failed"], {k: len(v) for k, v in serials.items()})
    assert actions == ["rotate_intermediate", "prepare_root", "activate_root", "retire_root"]
    assert counts["failed"] == 0, counts["errors"][:5]
    assert counts["ok"] > 500
    assert len(serials["backend"]) >= 5 and len(serials["frontend"]) >= 5, serials
    assert final["roots"] == 1 and final["root"] != old_root


def final_checks(mesh, old_root):
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "meshca", "status", "--home", str(mesh.ca.home), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    [root_doc] = status["roots"]
    bundle = subprocess.run(
        [sys.executable, "-m", "meshca", "bundle", "--home", str(mesh.ca.home)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    new_root = x509.load_pem_x509_certificates(bundle.encode())
    assert len(new_root) == 1
    store = xv.Store(new_root)
    for proc in (mesh.backend, mesh.frontend):
        _, ident = admin_get(proc, "/identity")
        assert ident["chain_valid"] and not ident["expired"]
        assert ident["issuer"] == status["intermediate"]["subject"]
        _, st = admin_get(proc, "/status")
        assert st["bundle"]["last_error"] is None
    # The backend's serving certificate, as a peer sees it, chains to the new root only.
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "check",
            mesh.inbound,
            "--admin",
            hostport(mesh.frontend.urls["admin"]),
            "--expect-id",
            BACKEND,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["issuer"] == status["intermediate"]["subject"]
    # The CA's own serving certificate too.
    ctx = ssl.create_default_context(cadata=bundle)
    host, port = mesh.ca.host_port
    import socket

    with (
        socket.create_connection((host, port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    assert leaf.issuer.rfc4514_string() == status["intermediate"]["subject"]
    del store
    return {"roots": len(status["roots"]), "root": root_doc["sha256"]}
