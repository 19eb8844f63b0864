"""Resident memory per idle TLS connection on the sidecar's inbound port.

Opens N mTLS connections (handshake done, no request: `header_timeout` is raised
for the run so that they stay) and reads the sidecar's VmRSS from /proc before
and after; the difference over N is the cost of one idle connection (the TLS
object and its buffers, the transport, the protocol and its parser).

    .venv/bin/python bench/bench_idle_connections.py [--connections 2000]
"""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from bench_handshakes import start_pair, stop_all


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    args = ap.parse_args()
    code = Path(__file__).resolve().parent.parent
    procs: list[subprocess.Popen] = []
    held: list[ssl.SSLSocket] = []
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as t:
        try:
            limits = {"header_timeout": 300, "max_connections": args.connections + 100}
            pair = start_pair(Path(t), code, procs, limits)
            pid = pair["sidecar_pid"]
            ctx = ssl.create_default_context(cafile=str(pair["bundle"]))
            ctx.check_hostname = False
            ctx.load_cert_chain(str(pair["client"]))
            host, port = pair["inbound"].rsplit(":", 1)
            # Warm up (first handshakes allocate caches), then measure from a settled state.
            for _ in range(50):
                ctx.wrap_socket(socket.create_connection((host, int(port)))).close()
            time.sleep(1)
            before = rss_kib(pid)
            for _ in range(args.connections):
                held.append(ctx.wrap_socket(socket.create_connection((host, int(port)))))
            time.sleep(2)
            after = rss_kib(pid)
            fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
            per = (after - before) / args.connections
            print(f"sidecar RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB with ", end="")
            print(f"{args.connections} idle mTLS connections ({fds} open fds)")
            print(f"{per:.1f} KiB per idle connection")
        finally:
            for s in held:
                s.close()
            stop_all(procs)


if __name__ == "__main__":
    main()
