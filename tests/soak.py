"""`make soak`: a bounded soak (default 3 minutes; `--seconds` or SOAK_SECONDS): steady
traffic through two sidecars while leaves renew every ~10 s and the CA rotates its
intermediate and its root; the resident memory of each sidecar is printed at the start and
at the end, with the requests served and failed. Not part of `make test`.

Traffic: one kept-alive client connection calling in a loop, and a new client
connection (new handshakes through the whole chain) ten times a second. A "cron" runs
`meshca rotate` every two seconds; every minute it forces a new intermediate or starts
a root rotation, in turn. Exit status 1 if a request failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import Mesh  # noqa: E402
from mesh import admin_get, hostport  # noqa: E402

CA_ARGS = ("--cert-ttl", "20", "--rate", "1000", "--burst", "1000", "--reload-interval", "0.5")
WAITS = ("--propagation-wait", "3", "--retire-wait", "6")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rotate(home: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "meshca", "rotate", "--home", str(home), "--json", *WAITS, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        return f"error: {out.stderr.strip()[-200:]}"
    return json.loads(out.stdout)["action"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 180)))
    args = ap.parse_args()
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        mesh = Mesh(Path(tmp), ca_args=CA_ARGS, ca_extra={"bundle_poll": 1, "retry_max": 2})
        host, port = hostport(mesh.frontend.urls["outbound"]).split(":")

        def call(conn: http.client.HTTPConnection, path: str, close: bool = False) -> None:
            conn.request(
                "GET",
                f"http://backend.default{path}",
                headers={"Connection": "close"} if close else {},
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                counts["ok"] += 1
            else:
                counts["failed"] += 1
                errors.append(f"{path}: {resp.status}")

        def steady() -> None:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    call(conn, f"/steady/{n}")
                except (OSError, http.client.HTTPException) as e:
                    counts["failed"] += 1
                    errors.append(f"steady: {e!r}")
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=30)
                time.sleep(0.005)
            conn.close()

        def fresh() -> None:
            while not stop.is_set():
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    call(conn, "/fresh", close=True)
                except (OSError, http.client.HTTPException) as e:
                    counts["failed"] += 1
                    errors.append(f"fresh: {e!r}")
                conn.close()
                time.sleep(0.1)

        sidecars = {"backend": mesh.backend, "frontend": mesh.frontend}
        serials: dict[str, set[str]] = {k: set() for k in sidecars}
        threads = [threading.Thread(target=steady), threading.Thread(target=fresh)]
        actions: list[str] = []
        try:
            for t in threads:
                t.start()
            time.sleep(5)  # warm: pools filled, first renewals scheduled
            start = {k: rss_mib(p.proc.pid) for k, p in sidecars.items()}
            began = time.monotonic()
            turn = 0
            last_forced = began
            while time.monotonic() - began < args.seconds:
                extra: tuple[str, ...] = ()
                if time.monotonic() - last_forced >= 60:
                    extra = (
                        ("--force-intermediate",) if turn % 2 == 0 else ("--start-root-rotation",)
                    )
                    turn += 1
                    last_forced = time.monotonic()
                action = rotate(mesh.ca.home, *extra)
                if action != "none":
                    actions.append(action)
                for k, p in sidecars.items():
                    status, doc = admin_get(p, "/identity")
                    if status == 200:
                        serials[k].add(doc["serial"])
                time.sleep(2)
            end = {k: rss_mib(p.proc.pid) for k, p in sidecars.items()}
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
            mesh.stop()
    print(f"soak: {args.seconds:g} s; requests ok {counts['ok']}, failed {counts['failed']}")
    print(f"soak: CA actions: {', '.join(actions) or 'none'}")
    for k in sidecars:
        print(
            f"soak: {k:8s} RSS start {start[k]:.1f} MiB, end {end[k]:.1f} MiB "
            f"({end[k] - start[k]:+.1f}); {len(serials[k])} certificates seen"
        )
    for e in errors[:10]:
        print(f"soak: failure: {e}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
