"""`make bench-ca`: enrollments per second end to end over HTTPS, and the raw signing rate.

End to end: a fresh CA (`meshca serve`) pinned to one core, load from a client
process pinned to the other core. Every enrollment is a new TLS connection (a
cold-starting pod), a join token verified and consumed in the ledger, a CSR
checked and a certificate signed and recorded, exactly as in production.
Raw: the same signing work in-process, without HTTP or TLS.

Prints medians of several rounds; the machine is noisy, so compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca import pki, store
from meshca.authority import Authority, init_ca, load_ec_key
from meshca.spiffe import SpiffeId
from meshca.tokens import JoinTokens


def make_csrs(n: int) -> list[str]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    out = []
    for _ in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        out.append(csr.public_bytes(serialization.Encoding.PEM).decode())
    return out


def raw_rate(home: Path, csrs: list[str]) -> tuple[float, float]:
    """(signatures/s of issue() alone, full in-process work/s: CSR check + issue + ledger)."""
    authority = Authority.load(home)
    keys = [pki.check_csr(c) for c in csrs]
    now = dt.datetime.now(dt.UTC)
    ttl = dt.timedelta(hours=24)
    t = time.perf_counter()
    for i, k in enumerate(keys):
        authority.issue(k, SpiffeId.parse(f"spiffe://cluster.local/ns/bench/sa/raw{i}"), now, ttl)
    sign_rate = len(keys) / (time.perf_counter() - t)

    ledger = store.Ledger(home / "raw-ledger.db")
    t = time.perf_counter()
    for i, c in enumerate(csrs):
        k = pki.check_csr(c)
        cert = authority.issue(
            k, SpiffeId.parse(f"spiffe://cluster.local/ns/bench/sa/f{i}"), now, ttl
        )
        ledger.record_issued(
            store.IssuedRecord(
                pki.serial_hex(cert), "x", "a", "b", "c", "bench", "i", pki.fingerprint(cert), None
            )
        )
        authority.chain_pem(cert)
    full_rate = len(csrs) / (time.perf_counter() - t)
    ledger.close()
    return sign_rate, full_rate


def taskset(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() > 1 else []


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            *taskset(0),
            sys.executable,
            "-m",
            "meshca",
            "--log-level",
            "WARNING",
            "serve",
            "--home",
            str(home),
            "--listen",
            "127.0.0.1:0",
            "--rate",
            "100000",
            "--burst",
            "100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if "serving on" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split("serving on ", 1)[1].strip()


async def client_run(url: str, bundle: str, jobs: list[tuple[str, str]], concurrency: int) -> dict:
    import aiohttp

    ctx = ssl.create_default_context(cadata=bundle)
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    latencies: list[float] = []
    errors: dict[int, int] = {}
    # force_close: one TLS handshake per enrollment, as a cold-starting pod does.
    conn = aiohttp.TCPConnector(ssl=ctx, force_close=True, limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            while not queue.empty():
                token, csr = queue.get_nowait()
                t = time.perf_counter()
                async with session.post(
                    url + "/v1/certificates",
                    json={"csr": csr},
                    headers={"Authorization": f"Bearer {token}"},
                ) as r:
                    await r.read()
                    if r.status != 200:
                        errors[r.status] = errors.get(r.status, 0) + 1
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "n": len(jobs),
        "wall": wall,
        "rate": len(jobs) / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
    }


def client_main() -> None:
    """Run as the load-generating child: read the job from stdin, print JSON results."""
    job = json.load(sys.stdin)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    res = runner(client_run(job["url"], job["bundle"], job["jobs"], job["concurrency"]))
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="enrollments per round (default 2000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main()
        return

    tmp = Path(tempfile.mkdtemp(prefix="meshca-bench-"))
    try:
        home = tmp / "ca"
        init_ca(home)
        print(f"making {args.n} CSRs ...", flush=True)
        csrs = make_csrs(args.n)
        sign_rate, full_rate = raw_rate(home, csrs[: min(1000, args.n)])
        print(f"raw signing (issue() only, one core):              {sign_rate:8.0f} certs/s")
        print(f"in-process enrollment work (CSR check+sign+ledger): {full_rate:8.0f} /s")

        authority = Authority.load(home)
        join = JoinTokens(load_ec_key(home / store.TOKEN_KEY_FILE), authority.trust_domain)
        proc, url = start_server(home)
        results = []
        try:
            for rnd in range(args.rounds):
                ledger = store.Ledger(home / store.LEDGER_FILE)
                now = dt.datetime.now(dt.UTC)
                jobs = []
                for i in range(args.n):
                    sid = SpiffeId.parse(f"spiffe://cluster.local/ns/bench/sa/pod{rnd}-{i}")
                    minted = join.mint(sid, now, dt.timedelta(minutes=30))
                    ledger.add_join_token(minted.jti, str(sid), minted.expires_at)
                    jobs.append((minted.token, csrs[i]))
                ledger.close()
                job = {
                    "url": url,
                    "bundle": authority.bundle_pem(),
                    "jobs": jobs,
                    "concurrency": args.concurrency,
                }
                cpu0 = cpu_seconds(proc.pid)
                out = subprocess.run(
                    [*taskset(1), sys.executable, __file__, "--client"],
                    input=json.dumps(job),
                    capture_output=True,
                    text=True,
                    check=True,
                )
                res = json.loads(out.stdout)
                res["server_cpu"] = (cpu_seconds(proc.pid) - cpu0) / res["wall"]
                res["server_ms_per"] = (cpu_seconds(proc.pid) - cpu0) / res["n"] * 1000
                results.append(res)
                print(
                    f"round {rnd + 1}: {res['rate']:7.0f} enrollments/s  "
                    f"p50 {res['p50_ms']:6.1f} ms  p99 {res['p99_ms']:6.1f} ms  "
                    f"server CPU {res['server_cpu']:4.0%} ({res['server_ms_per']:.2f} ms each)  "
                    f"errors {res['errors'] or 0}",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        med = statistics.median(r["rate"] for r in results)
        pinned = "server pinned to core 0, client to core 1" if taskset(0) else "unpinned"
        print(
            f"\nend to end over HTTPS ({pinned}, {args.concurrency} concurrent, "
            f"new TLS connection each): median {med:.0f} enrollments/s"
        )
        per = statistics.median(r["server_ms_per"] for r in results)
        print(
            f"server CPU per enrollment: median {per:.2f} ms "
            f"(one core's ceiling {1000 / per:.0f}/s)"
        )
        print(f"10,000-pod cold start at that rate: {10000 / med:.0f} s")
        print(f"ratio end-to-end / raw signing: {med / sign_rate:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
