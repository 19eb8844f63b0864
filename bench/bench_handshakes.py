"""Full TLS handshakes per second, and server CPU per handshake, on the CA's port and on
the sidecar's inbound (mTLS) port.

`openssl s_time -new` opens a new connection for every handshake (no resumption;
the servers offer none anyway) for a fixed time; the server's CPU time is read
from /proc before and after, so the CPU per handshake does not depend on how
the two cores are shared with the client. `--code DIR` runs another checkout
(for example `git archive HEAD | tar -x -C /tmp/old`) to compare before/after.

    .venv/bin/python bench/bench_handshakes.py [--seconds 10] [--rounds 3] [--code DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from meshca.client import EnrollmentClient, new_key_and_csr, private_key_pem

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def spawn(args: list[str], log: Path, code: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(code)}
    return subprocess.Popen(
        args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=code
    )


def wait_for(log: Path, pattern: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text() if log.exists() else "")
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r} in {log}:\n{log.read_text()}")


def s_time(hostport: str, seconds: int, ca: Path, cert: Path | None) -> int:
    args = ["openssl", "s_time", "-connect", hostport, "-new", "-time", str(seconds)]
    args += ["-CAfile", str(ca)]
    if cert is not None:
        args += ["-cert", str(cert), "-key", str(cert)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
    if not m:
        raise SystemExit(f"openssl s_time said:\n{out}")
    return int(m.group(1))


def measure(pid: int, hostport: str, seconds: int, ca: Path, cert: Path | None) -> tuple:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    n = s_time(hostport, seconds, ca, cert)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    return n / (t1 - t0), (c1 - c0) / max(n, 1) * 1000


def start_pair(tmp: Path, code: Path, procs: list, inbound_extra: dict | None = None) -> dict:
    """A CA and a sidecar (inbound only, no app behind it) from `code`; a client certificate.

    Returns the processes' pids, where they listen, the bundle and the client PEM."""
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(code)}

    def meshca(*args: str) -> str:
        return subprocess.run(
            [py, "-m", "meshca", *args],
            check=True,
            capture_output=True,
            text=True,
            cwd=code,
            env=env,
        ).stdout

    home = tmp / "ca"
    meshca("init", "--home", str(home))
    ca = spawn(
        [py, "-m", "meshca", "serve", "--home", str(home), "--listen", "127.0.0.1:0"],
        tmp / "ca.log",
        code,
    )
    procs.append(ca)
    ca_url = wait_for(tmp / "ca.log", r"serving on (https://\S+)")
    bundle = tmp / "bundle.pem"
    bundle.write_text(meshca("bundle", "--home", str(home)))

    def token(sid: str) -> str:
        return meshca("token", "--home", str(home), "--spiffe-id", sid).strip()

    (tmp / "token").write_text(token("spiffe://cluster.local/ns/default/sa/backend"))
    cfg = {
        "ca": {"url": ca_url, "bundle": str(bundle), "token_file": str(tmp / "token")},
        "inbound": {"listen": "127.0.0.1:0", "app": "127.0.0.1:9", **(inbound_extra or {})},
        "admin": {"listen": "127.0.0.1:0"},
        "health": {"listen": "127.0.0.1:0"},
    }
    (tmp / "sidecar.yaml").write_text(yaml.safe_dump(cfg))
    sc = spawn(
        [py, "-m", "sidecar", "run", "--config", str(tmp / "sidecar.yaml")],
        tmp / "sidecar.log",
        code,
    )
    procs.append(sc)
    inbound = wait_for(tmp / "sidecar.log", r"inbound listening on https://(\S+)")
    admin = wait_for(tmp / "sidecar.log", r"admin listening on (http://\S+)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(admin + "/ready", timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.1)
    key, csr = new_key_and_csr()
    got = asyncio.run(
        EnrollmentClient(ca_url, bundle.read_text()).enroll(
            csr, token("spiffe://cluster.local/ns/default/sa/client")
        )
    )
    client = tmp / "client.pem"
    client.write_bytes(got.chain_pem.encode() + private_key_pem(key))
    return {
        "ca_pid": ca.pid,
        "ca": ca_url.removeprefix("https://"),
        "sidecar_pid": sc.pid,
        "inbound": inbound,
        "bundle": bundle,
        "client": client,
    }


def stop_all(procs: list) -> None:
    for p in procs:
        p.terminate()
        p.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    code = args.code.resolve()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench-hs-") as t:
        try:
            pair = start_pair(Path(t), code, procs)
            targets = {
                "ca": (pair["ca_pid"], pair["ca"], None),
                "inbound (mTLS)": (pair["sidecar_pid"], pair["inbound"], pair["client"]),
            }
            results: dict[str, list[tuple[float, float]]] = {k: [] for k in targets}
            for _ in range(args.rounds):
                for name, (pid, hp, cert) in targets.items():
                    results[name].append(measure(pid, hp, args.seconds, pair["bundle"], cert))
            print(f"code: {code}  ({args.rounds} rounds of {args.seconds} s, medians)")
            for name, rows in results.items():
                rate = statistics.median(r[0] for r in rows)
                cpu = statistics.median(r[1] for r in rows)
                print(f"{name:16s} {rate:8.0f} handshakes/s   {cpu:6.3f} ms server CPU each")
        finally:
            stop_all(procs)


if __name__ == "__main__":
    main()
