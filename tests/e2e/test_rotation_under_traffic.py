"""Certificates renew several times while a client sends requests without pause: zero failures.

The CA issues 4-second certificates, so both sidecars renew about every two
seconds with a fresh key; open keep-alive connections are not dropped and new
handshakes use the new certificates.
"""

from __future__ import annotations

import http.client
import threading
import time

from conftest import Mesh
from mesh import admin_get, hostport


def test_zero_failures_across_renewals(tmp_path):
    mesh = Mesh(tmp_path, ca_args=("--cert-ttl", "4", "--rate", "100", "--burst", "100"))
    try:
        serials = {"backend": set(), "frontend": set()}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                for name in serials:
                    status, doc = admin_get(getattr(mesh, name), "/identity")
                    if status == 200:
                        serials[name].add(doc["serial"])
                time.sleep(0.2)

        watcher = threading.Thread(target=watch)
        watcher.start()
        ok = failed = 0
        errors = []
        host, port = hostport(mesh.frontend.urls["outbound"]).split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        deadline = time.monotonic() + 12
        n = 0
        try:
            while time.monotonic() < deadline:
                n += 1
                if n % 25 == 0:  # also open fresh client connections now and then
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=10)
                try:
                    conn.request("GET", f"http://backend.default/tick/{n}")
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 200:
                        ok += 1
                    else:
                        failed += 1
                        errors.append(resp.status)
                except (OSError, http.client.HTTPException) as e:
                    failed += 1
                    errors.append(repr(e))
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=10)
        finally:
            stop.set()
            watcher.join()
            conn.close()
        assert failed == 0, errors[:5]
        assert ok > 100
        assert len(serials["backend"]) >= 3 and len(serials["frontend"]) >= 3, serials
    finally:
        mesh.stop()
