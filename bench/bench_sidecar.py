"""`make bench`: requests/s and latency for an app called directly, through the inbound
sidecar (mTLS), and through both sidecars (plain HTTP -> outbound -> mTLS -> inbound -> app).

One tool drives all three paths in the same run: ApacheBench (`ab`, Debian's
apache2-utils), keep-alive, fixed concurrency, with a client certificate from
the CA for the inbound path. Rounds interleave the paths; medians are printed
with ratios to the direct path. Everything shares this machine's two cores, as
a pod's containers share a node. The sidecars' resident memory is read from
/proc after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from meshca.authority import init_ca
from meshca.client import EnrollmentClient, new_key_and_csr, private_key_pem


def spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )


def wait_for(log: Path, pattern: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text() if log.exists() else "")
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r} in {log}:\n{log.read_text()}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ten_rule_policy(frontend_id: str) -> dict:
    """Nine rules that do not match the benchmark's requests, then the one that allows them."""
    rules = [
        {"name": "no-admin", "action": "DENY", "to": {"paths": ["/admin", "/admin/*"]}},
        {"name": "no-debug", "action": "DENY", "to": {"paths": ["/debug/*"]}},
        {"name": "no-delete", "action": "DENY", "to": {"methods": ["DELETE"]}},
        {"name": "no-kube-system", "action": "DENY", "from": {"namespaces": ["kube-system"]}},
        {"name": "audit-writes", "action": "AUDIT", "to": {"methods": ["POST", "PUT"]}},
        {
            "name": "ops-metrics",
            "action": "ALLOW",
            "from": {"principals": ["spiffe://cluster.local/ns/ops/*"]},
            "to": {"paths": ["/metrics"]},
        },
        {"name": "shop", "action": "ALLOW", "from": {"namespaces": ["shop"]}},
        {"name": "admins", "action": "ALLOW", "when": [{"claim": "groups", "values": ["admins"]}]},
        {"name": "health", "action": "ALLOW", "to": {"paths": ["/healthz"], "methods": ["GET"]}},
        {
            "name": "frontend",
            "action": "ALLOW",
            "from": {"principals": [frontend_id], "request_principals": ["meshca/cluster.local/*"]},
            "to": {"paths": ["/", "/process"], "methods": ["GET", "POST"]},
        },
    ]
    return {"rules": rules}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def ten_routes() -> list[dict]:
    """Nine routes the benchmark's requests do not match, then one that sends them everywhere."""
    routes: list[dict] = [
        {"name": "canary", "match": {"headers": {"x-canary": "true"}}, "to": [{"subset": "b"}]},
        {"name": "beta", "match": {"headers": {"x-user": {"prefix": "beta-"}}}},
        {"name": "mobile", "match": {"headers": {"user-agent": {"regex": ".*Mobile.*"}}}},
        {"name": "admin", "match": {"path_prefix": "/admin"}, "to": [{"subset": "a"}]},
        {"name": "api-v2", "match": {"path_prefix": "/api/v2"}, "to": [{"subset": "b"}]},
        {"name": "health", "match": {"path_exact": "/healthz"}},
        {"name": "writes", "match": {"methods": ["POST", "PUT", "DELETE"]}},
        {"name": "debug", "match": {"path_prefix": "/debug"}, "fault": {"abort": {"percent": 100}}},
        {"name": "slow", "match": {"headers": {"x-slow": "1"}}, "fault": {"delay": {"seconds": 1}}},
        {"name": "rest", "match": {"path_prefix": "/"}},
    ]
    return routes


def run_ab(url: str, n: int, c: int, extra: list[str]) -> dict:
    out = subprocess.run(
        ["ab", "-q", "-k", "-n", str(n), "-c", str(c), *extra, url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout
    if out.returncode != 0 or "Requests per second" not in text:
        raise SystemExit(f"ab failed on {url}: {out.stderr}\n{text}")
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", text).group(1))
    failed = int(re.search(r"Failed requests:\s+(\d+)", text).group(1))
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", text)
    p50 = float(re.search(r"^\s+50%\s+(\d+)", text, re.M).group(1))
    p99 = float(re.search(r"^\s+99%\s+(\d+)", text, re.M).group(1))
    return {
        "rps": rps,
        "p50": p50,
        "p99": p99,
        "failed": failed + (int(non2xx.group(1)) if non2xx else 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20000, help="requests per path per round")
    ap.add_argument("-c", type=int, default=32, help="concurrent connections (default 32)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="also record both sidecars with py-spy (if installed) on the two-sidecar path",
    )
    ap.add_argument("--profile-path", default="both sidecars", help="which path to profile")
    args = ap.parse_args()
    if not shutil.which("ab"):
        raise SystemExit("ab not found: apt-get install apache2-utils (make bench does this)")

    tmp = Path(tempfile.mkdtemp(prefix="meshca-bench-sidecar-"))
    procs: list[subprocess.Popen] = []
    py = sys.executable
    try:
        home = tmp / "ca"
        init_ca(home)
        ca = spawn(
            [
                py,
                "-m",
                "meshca",
                "--log-level",
                "WARNING",
                "serve",
                "--home",
                str(home),
                "--listen",
                "127.0.0.1:0",
            ],
            tmp / "ca.log",
        )
        procs.append(ca)
        ca_url = wait_for(tmp / "ca.log", r"serving on (https://\S+)")
        bundle = subprocess.run(
            [py, "-m", "meshca", "bundle", "--home", str(home)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

        app_port = free_port()
        procs.append(
            spawn(
                [py, "-m", "services.backend", "--listen", f"127.0.0.1:{app_port}"], tmp / "app.log"
            )
        )
        wait_for(tmp / "app.log", r"(listening)")

        def sidecar(name: str, sid: str, extra: dict) -> tuple[subprocess.Popen, dict]:
            d = tmp / name
            d.mkdir(exist_ok=True)
            (d / "ca-root.pem").write_text(bundle)
            token = subprocess.run(
                [py, "-m", "meshca", "token", "--home", str(home), "--spiffe-id", sid],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            (d / "token").write_text(token)
            doc = {
                "ca": {"url": ca_url, "bundle": "ca-root.pem", "token_file": "token"},
                "admin": {"listen": "127.0.0.1:0"},
                "health": {"listen": "127.0.0.1:0"},
                **extra,
            }
            (d / "sidecar.yaml").write_text(yaml.safe_dump(doc))
            p = spawn(
                [
                    py,
                    "-m",
                    "sidecar",
                    "--log-level",
                    "WARNING",
                    "run",
                    "--config",
                    str(d / "sidecar.yaml"),
                ],
                d / "out.log",
            )
            procs.append(p)
            urls = {
                k: wait_for(d / "out.log", rf"{k} listening on \S+://(\S+)")
                for k in ("admin", *(x for x in extra if x in ("inbound", "outbound")))
            }
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://{urls['admin']}/ready")
                    break
                except OSError:
                    time.sleep(0.05)
            return p, urls

        backend_id = "spiffe://cluster.local/ns/default/sa/backend"
        # Listening on every loopback address, so that 127.0.0.1-3 are three endpoints of
        # one service for the balancing row (the same backend capacity as the others).
        bp, burls = sidecar(
            "backend",
            backend_id,
            {"inbound": {"listen": "0.0.0.0:0", "app": f"127.0.0.1:{app_port}"}},
        )
        backend_port = burls["inbound"].rsplit(":", 1)[1]
        burls["inbound"] = f"127.0.0.1:{backend_port}"
        # The same app behind a second sidecar that checks a JWT and a 10-rule policy.
        frontend_id = "spiffe://cluster.local/ns/default/sa/frontend"
        (tmp / "secure").mkdir()
        (tmp / "secure" / "policy.yaml").write_text(yaml.safe_dump(ten_rule_policy(frontend_id)))
        sp, surls = sidecar(
            "secure",
            backend_id,
            {
                "inbound": {"listen": "127.0.0.1:0", "app": f"127.0.0.1:{app_port}"},
                "jwt": {
                    "issuers": [
                        {
                            "issuer": "meshca/cluster.local",
                            "audiences": ["backend"],
                            "jwks_uri": ca_url + "/v1/jwks",
                        }
                    ]
                },
                "policy": {"file": "policy.yaml"},
            },
        )
        # The same pair with metrics on (both ends count every request), for the cost of metrics.
        mbp, mburls = sidecar(
            "backend-metrics",
            backend_id,
            {
                "inbound": {"listen": "127.0.0.1:0", "app": f"127.0.0.1:{app_port}"},
                "metrics": {"listen": "127.0.0.1:0"},
            },
        )
        mfp, mfurls = sidecar(
            "frontend-metrics",
            frontend_id,
            {
                "outbound": {
                    "listen": "127.0.0.1:0",
                    "services": {
                        "backend.default": {
                            "endpoints": [mburls["inbound"]],
                            "identity": backend_id,
                        }
                    },
                },
                "metrics": {"listen": "127.0.0.1:0"},
            },
        )
        fp, furls = sidecar(
            "frontend",
            frontend_id,
            {
                "outbound": {
                    "listen": "127.0.0.1:0",
                    "services": {
                        "backend.default": {
                            "endpoints": [burls["inbound"]],
                            "identity": backend_id,
                        },
                        "secure.default": {
                            "endpoints": [surls["inbound"]],
                            "identity": backend_id,
                            "jwt_audience": "backend",
                        },
                        "balanced.default": {
                            "endpoints": [
                                {"address": f"127.0.0.{n}:{backend_port}", "labels": {"s": s}}
                                for n, s in ((1, "a"), (2, "b"), (3, "b"))
                            ],
                            "identity": backend_id,
                            "subsets": {"a": {"s": "a"}, "b": {"s": "b"}},
                            "routes": ten_routes(),
                        },
                    },
                }
            },
        )

        # A client certificate for ab on the inbound path (ab wants cert and key in one file).
        key, csr = new_key_and_csr()
        tok = subprocess.run(
            [
                py,
                "-m",
                "meshca",
                "token",
                "--home",
                str(home),
                "--spiffe-id",
                "spiffe://cluster.local/ns/bench/sa/ab",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        got = asyncio.run(EnrollmentClient(ca_url, bundle).enroll(csr, tok))
        client_pem = tmp / "ab-client.pem"
        client_pem.write_bytes(got.chain_pem.encode() + private_key_pem(key))

        paths = {
            "direct (app)": (f"http://127.0.0.1:{app_port}/", []),
            "inbound sidecar (mTLS)": (f"https://{burls['inbound']}/", ["-E", str(client_pem)]),
            "both sidecars": (f"http://{furls['outbound']}/", ["-H", "Host: backend.default"]),
            "both + JWT + 10-rule policy": (
                f"http://{furls['outbound']}/",
                ["-H", "Host: secure.default"],
            ),
            "both, 3 endpoints, 10 routes": (
                f"http://{furls['outbound']}/",
                ["-H", "Host: balanced.default"],
            ),
            "both sidecars, metrics on": (
                f"http://{mfurls['outbound']}/",
                ["-H", "Host: backend.default"],
            ),
        }
        for url, extra in paths.values():  # warm-up: pools, JIT-free but caches
            run_ab(url, 2000, args.c, extra)
        if args.profile and shutil.which("py-spy"):
            out = Path(args.profile)
            out.mkdir(parents=True, exist_ok=True)
            spies = [
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--format",
                        "raw",
                        "-r",
                        "200",
                        "-d",
                        "8",
                        "-o",
                        str(out / f"{name}.txt"),
                        "-p",
                        str(p.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, p in (("backend", bp), ("secure", sp), ("frontend", fp))
            ]
            url, extra = paths[args.profile_path]
            run_ab(url, args.n * 3, args.c, extra)
            for spy in spies:
                spy.wait()
        results: dict[str, list[dict]] = {k: [] for k in paths}
        sidecars = [bp.pid, sp.pid, fp.pid, mbp.pid, mfp.pid]
        for rnd in range(args.rounds):
            for name, (url, extra) in paths.items():
                cpu0 = cpu_seconds(sidecars)
                r = run_ab(url, args.n, args.c, extra)
                # CPU the sidecars spent per request: steadier than req/s on a busy machine
                r["cpu_us"] = (cpu_seconds(sidecars) - cpu0) * 1e6 / args.n
                results[name].append(r)
                print(
                    f"round {rnd + 1} {name:24} {r['rps']:8.0f} req/s  p50 {r['p50']:.0f} ms  "
                    f"p99 {r['p99']:.0f} ms  sidecar CPU {r['cpu_us']:.0f} us/req  "
                    f"failed {r['failed']}",
                    flush=True,
                )
        direct = statistics.median(r["rps"] for r in results["direct (app)"])
        print(
            f"\n{args.rounds} rounds x {args.n} requests, {args.c} keep-alive connections, "
            f"ab; medians:\n"
        )
        print(
            f"{'path':30} {'req/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'CPU us/req':>10} {'failed':>7}"
        )
        for name, rs in results.items():
            rps = statistics.median(r["rps"] for r in rs)
            print(
                f"{name:30} {rps:8.0f} {rps / direct:6.2f} "
                f"{statistics.median(r['p50'] for r in rs):7.0f} "
                f"{statistics.median(r['p99'] for r in rs):7.0f} "
                f"{statistics.median(r['cpu_us'] for r in rs):10.0f} "
                f"{sum(r['failed'] for r in rs):7d}"
            )
        one = statistics.median(r["cpu_us"] for r in results["both sidecars"])
        three = statistics.median(r["cpu_us"] for r in results["both, 3 endpoints, 10 routes"])
        print(
            f"\nbalancing over 3 endpoints with a 10-route table costs "
            f"{(three / one - 1) * 100:+.1f} % sidecar CPU per request against one endpoint"
        )
        metered = statistics.median(r["cpu_us"] for r in results["both sidecars, metrics on"])
        print(
            f"metrics (Istio's request metrics at both ends) cost "
            f"{(metered / one - 1) * 100:+.1f} % sidecar CPU per request"
        )
        both = statistics.median(r["rps"] for r in results["both sidecars"])
        secured = statistics.median(r["rps"] for r in results["both + JWT + 10-rule policy"])
        print(
            f"\ncost of JWT validation + 10-rule policy on the two-sidecar path: "
            f"{(1 - secured / both) * 100:.1f} % of throughput"
        )
        print(
            f"\nresident memory after the run: backend sidecar {rss_mib(bp.pid):.1f} MiB, "
            f"frontend sidecar {rss_mib(fp.pid):.1f} MiB"
        )
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
