"""`make bench-peers`: the sidecar beside HAProxy doing the same work, CPU per request of each.

The race of the performance issue. Both proxies get certificates from one meshca for the
same SPIFFE IDs, the same app (nginx: one worker, `return 200 "ok\\n"`, keep-alive), the
same load generator (wrk) and the same core, and do the same work
(bench/peers/haproxy-*.cfg, modelled on shared/reference/haproxy/):

- inbound: terminate mTLS with a required client certificate chained to the mesh CA;
  on the JWT paths also require a bearer JWT (ES256, one key: alg, iss, aud, exp and the
  signature; HAProxy answers 401 without one, the sidecar's policy requires a request
  principal so it answers 401 `jwt_required`); forward plaintext to the app over kept-alive
  connections;
- outbound: take the app's plain HTTP, originate mTLS with the pod's certificate from a
  pool of kept-alive connections, verify the server (the sidecar: its SPIFFE ID; HAProxy
  cannot read a URI SAN, so it checks the service's DNS SAN, which meshca puts in both
  proxies' inbound certificates: `verifyhost`).

Paths (c = concurrent connections of wrk):

| path | wrk -> ... -> nginx | counted |
| --- | --- | --- |
| 1 hop, keep-alive, c=32 | wrk -> shim -> inbound | inbound |
| 2 hops, c=32 | wrk -> outbound -> inbound | both |
| 2 hops + JWT, one token | the same, one `Authorization` header | both |
| 2 hops + JWT, a new token each | bench/peers/tokens.lua walks a file of distinct tokens | both |
| 1 hop, new connection each | wrk `Connection: close` -> shim (no TLS session reuse) | inbound |
| c=1 latency | wrk -c1 to nginx directly, and through 2 hops | both |

wrk cannot present a client certificate, so on the one-hop paths a TLS shim (a second
HAProxy in `mode tcp`, bench/peers/haproxy-shim.cfg) originates mTLS with the load
generator's own certificate. It belongs to the load generator: its CPU is never counted.
The two-hop paths need no shim: wrk speaks plain HTTP to the outbound proxy, as the app
would. The new-token path walks a pool of distinct tokens in order, continuing where the
previous run on that proxy stopped: a token comes back only after the whole pool (150,000
by default), far past the sidecar's cache of 10,000 verified tokens, so it never hits;
a run that would need more tokens than the pool is an error.

CPU accounting: utime + stime (/proc/PID/stat, all threads) of the proxy processes on the
path, read before and after each measured run; CPU per request = that delta / the requests
wrk completed. The sidecar is one process per pod role (outbound; inbound; inbound with
JWT), HAProxy one process per role (outbound; inbound, both frontends); processes not on
the path are not counted. Loopback TCP's kernel work is charged to whichever process
sends, alike for both. Also printed: req/s, p50/p99 (wrk --latency), the resident memory
(VmRSS) of every proxy before the first round and after the last, and after the last
how much of it is the process's own (RssAnon) and how much pages of mapped files (RssFile).

Pinning: the proxies under test run on core 0 (`taskset -c 0`), wrk, the shim and nginx
on core 1, so the load generator never takes CPU from the proxies, and both proxies of a
2-hop path share one core alike. Tried both ways on this shared 2-core machine: pinned,
HAProxy's 2-hop CPU per request varied 117-130 us over 4 runs against 71-122 us unpinned
(the sidecar's spread was alike either way), and the sidecar's c=1 latency was steadier;
unpinned, both proxies spent less CPU per request at high rates (the two hops run in
parallel, more requests per wake-up), and the ratios were no better for the sidecar.
`--no-pin` runs everything unpinned. `--sched-batch` runs every proxy under test, of
both kinds, under SCHED_BATCH, where a woken process does not preempt the one running
(an experiment on what the shared core's wake-ups cost: docs/sidecar.md, ninth run).

The floor: on the keep-alive paths (1 hop, 2 hops) a third "proxy" runs in each round,
bench/peers/tlspipe.py, a bare TLS byte pipe on uvloop (the same mTLS and verification,
one upstream connection per client connection, no HTTP work at all). What it costs is
what any Python proxy on uvloop and the ssl module pays before doing anything; the
sidecar minus the pipe is the sidecar's own HTTP work. It is printed as a reference, not
a target.

Rounds interleave paths and proxies (round 1: every path on both, the proxy order
alternating per round, then round 2 ...); medians over rounds. Each path is warmed up
first. Before measuring, every path is checked once: 200 and nginx's body through each
proxy, 401 without a token and with a token of another key on the JWT paths, and a
client without a certificate refused by each inbound. Any wrk socket error, non-2xx
response or failed check is printed and makes the bench exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meshca.authority import init_ca
from meshca.client import EnrollmentClient, new_key_and_csr, private_key_pem

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "peers"
TRUST = "cluster.local"
API_ID = f"spiffe://{TRUST}/ns/default/sa/api"  # the inbound (server) pod
WEB_ID = f"spiffe://{TRUST}/ns/default/sa/web"  # the outbound (client) pod
LOADGEN_ID = f"spiffe://{TRUST}/ns/bench/sa/loadgen"  # the shim's client certificate
SVC = "api.default"  # service names: the Host the app sends, the SNI and DNS SAN
SVC_JWT = "api-jwt.default"
ISSUER = "https://idp.bench.local"
AUDIENCE = API_ID
KID = "bench-es256"
BODY = b"ok\n"
PROXIES = ("haproxy", "sidecar")
TOKEN_CACHE = 4096  # sidecar/policy/authn.py CACHE_SIZE: the pool must be far larger


@dataclass(frozen=True)
class PathSpec:
    """One measured path: how wrk is pointed at it, which proxy roles do the work."""

    key: str
    title: str
    target: str  # the issue's target, as printed
    minimum: float  # ratio HAProxy us / sidecar us must be at least this
    roles: tuple[str, ...]  # proxy processes whose CPU is counted
    conns: int = 32
    new_conn: bool = False
    jwt: str | None = None  # None, "one" or "each"


PATHS = (
    PathSpec("hop1", "1 hop, mTLS only, keep-alive, c=32", ">= 0.5", 0.5, ("in",)),
    PathSpec("hop2", "2 hops, mTLS only, c=32", ">= 0.5", 0.5, ("out", "in")),
    PathSpec(
        "jwt1",
        "2 hops, mTLS + JWT (ES256), one token reused, c=32",
        ">= 1.5",
        1.5,
        ("out", "in_jwt"),
        jwt="one",
    ),
    PathSpec(
        "jwtN",
        "2 hops, mTLS + JWT, a new token on every request, c=32",
        ">= 0.8",
        0.8,
        ("out", "in_jwt"),
        jwt="each",
    ),
    PathSpec(
        "hop1new",
        "full mTLS handshake per connection (1 hop, new connection per request, c=32)",
        ">= 0.75",
        0.75,
        ("in",),
        new_conn=True,
    ),
)
LATENCY = PathSpec("hop2c1", "2 hops, mTLS only, c=1", "", 0, ("out", "in"), conns=1)
DIRECT = "direct"  # wrk -c1 straight to nginx
PIPE = "pipe"  # bench/peers/tlspipe.py: the transport alone, no HTTP work (a reference)
PIPE_PATHS = ("hop1", "hop2")


class BenchError(Exception):
    """Setup or a check failed: the message says what, with the log it came from."""


# ---------------------------------------------------------------- processes


class Procs:
    """Every process the bench starts; all are stopped on exit, killed if they linger."""

    def __init__(self, pin: bool, sched_batch: bool = False) -> None:
        self.pin = pin
        self.sched_batch = sched_batch
        self.started: list[subprocess.Popen] = []

    def spawn(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, core: int | None = None
    ) -> subprocess.Popen:
        """Start `args` with stdout and stderr to `log`, on `core` when pinning; the proxies
        (core 0) under SCHED_BATCH with `--sched-batch`."""
        if self.sched_batch and core == 0:
            args = ["chrt", "--batch", "0", *args]  # chrt execs too, and threads inherit it
        if self.pin and core is not None:
            args = ["taskset", "-c", str(core), *args]  # taskset execs: the PID is the program's
        with open(log, "wb") as out:
            p = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                preexec_fn=die_with_parent,
            )
        self.started.append(p)
        return p

    def stop_all(self) -> None:
        """SIGTERM in reverse start order, then SIGKILL whatever is left after 10 s."""
        for p in reversed(self.started):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.started:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the bench dies, even by SIGKILL (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; kept across exec (taskset, ...)


def tail(log: Path, lines: int = 30) -> str:
    """The last lines of a log, for an error message."""
    if not log.exists():
        return f"({log} does not exist)"
    with open(log, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 30) -> str:
    """Group 1 of the first match of `pattern` in `log`; BenchError with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace") if log.exists() else "")
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise BenchError(f"{proc.args} exited {proc.returncode}; {log}:\n{tail(log)}")
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for {pattern!r} in {log}:\n{tail(log)}")


def wait_port(port: int, log: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    """Until 127.0.0.1:port accepts a connection; BenchError with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args} exited {proc.returncode}; {log}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for port {port}; {log}:\n{tail(log)}")


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes so far, all their threads (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def rss_mib(pid: int) -> float:
    """VmRSS of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for process {pid}")


def rss_split_mib(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile) of a process in MiB: memory of its own, and pages of mapped files
    (code, read-only data), which processes mapping the same files share."""
    got = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return got.get("RssAnon", 0.0), got.get("RssFile", 0.0)


# ---------------------------------------------------------------- certificates and tokens


def b64url(raw: bytes) -> bytes:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def sign_es256(key: ec.EllipticCurvePrivateKey, claims: dict) -> str:
    """A compact ES256 JWS of `claims` with the bench's kid."""
    head = b64url(json.dumps({"alg": "ES256", "typ": "JWT", "kid": KID}).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = head + b"." + body
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return (signing_input + b"." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))).decode()


def claims_for(n: int, now: int) -> dict:
    """Token number `n`: the issuer, audience and 1 h of life HAProxy and the sidecar check."""
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"user-{n}",
        "iat": now,
        "exp": now + 3600,
        "jti": f"bench-{n:08d}",
    }


def make_tokens(key_pem: bytes, start: int, count: int, now: int) -> bytes:
    """Tokens start..start+count-1, one a line (run in a worker process)."""
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return b"".join(
        sign_es256(key, claims_for(n, now)).encode() + b"\n" for n in range(start, start + count)
    )


def jwks_of(key: ec.EllipticCurvePrivateKey) -> dict:
    """The public JWKS (one P-256 key, our kid) the sidecar reads from `jwks_file`."""
    nums = key.public_key().public_numbers()
    return {
        "keys": [
            {
                "kty": "EC",
                "crv": "P-256",
                "kid": KID,
                "alg": "ES256",
                "use": "sig",
                "x": b64url(nums.x.to_bytes(32, "big")).decode(),
                "y": b64url(nums.y.to_bytes(32, "big")).decode(),
            }
        ]
    }


def meshca_token(home: Path, spiffe_id: str, dns: list[str]) -> str:
    """A one-time join token for `spiffe_id`, its certificate to carry `dns` as DNS SANs."""
    args = [sys.executable, "-m", "meshca", "token", "--home", str(home), "--spiffe-id", spiffe_id]
    for d in dns:
        args += ["--dns", d]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()


def enroll_bundle(home: Path, ca_url: str, roots: str, spiffe_id: str, dns: list[str]) -> bytes:
    """Chain + key (HAProxy's `crt` file) for `spiffe_id`, enrolled as a sidecar would be."""
    key, csr = new_key_and_csr()
    got = asyncio.run(
        EnrollmentClient(ca_url, roots).enroll(csr, meshca_token(home, spiffe_id, dns))
    )
    return got.chain_pem.encode() + private_key_pem(key)


# ---------------------------------------------------------------- wrk


@dataclass
class Run:
    """One wrk run and the proxies' CPU during it."""

    requests: int
    rps: float
    p50_us: float
    p99_us: float
    cpu_us: float = float("nan")  # CPU of the counted proxies per request
    role_us: dict[str, float] = field(default_factory=dict)  # the same, per process
    errors: list[str] = field(default_factory=list)


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _duration_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise BenchError(f"wrk printed a latency I cannot read: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Run:
    """Requests, req/s, p50, p99 and any errors from wrk --latency's output."""

    def need(pattern: str) -> str:
        m = re.search(pattern, out, re.M)
        if not m:
            raise BenchError(f"wrk's output lacks {pattern!r}:\n{out}")
        return m.group(1)

    run = Run(
        requests=int(need(r"^\s*(\d+) requests in ")),
        rps=float(need(r"^Requests/sec:\s+([\d.]+)")),
        p50_us=_duration_us(need(r"^\s+50%\s+(\S+)")),
        p99_us=_duration_us(need(r"^\s+99%\s+(\S+)")),
    )
    sock = re.search(r"Socket errors: (.*)", out)
    if sock:
        run.errors.append(f"socket errors: {sock.group(1)}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        run.errors.append(f"{non2xx.group(1)} non-2xx responses")
    if run.requests == 0:
        run.errors.append("no request completed")
    return run


# ---------------------------------------------------------------- the bench


class Bench:
    """Sets up CA, app, HAProxy, sidecars and shim in a temp dir, checks, measures."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = Procs(args.pin, args.sched_batch)
        self.py = sys.executable
        self.certs = tmp / "certs"
        self.certs.mkdir()
        self.pids: dict[str, dict[str, int]] = {"haproxy": {}, "sidecar": {}, PIPE: {}}
        self.token_cursor = {p: 0 for p in PROXIES}
        self.errors: list[str] = []
        self.request_paths: set[str] = set()  # what the sidecars run (their /status)

    # ---- setup

    def start_ca(self) -> None:
        """`meshca serve` on a free port, as bench_sidecar.py does; its URL and roots."""
        home = self.tmp / "ca"
        init_ca(home, trust_domain=TRUST)
        log = self.tmp / "ca.log"
        p = self.procs.spawn(
            [
                self.py,
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
            log,
        )
        self.ca_home = home
        self.ca_url = wait_for(log, r"serving on (https://\S+)", p)
        self.roots = subprocess.run(
            [self.py, "-m", "meshca", "bundle", "--home", str(home)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def write_certs(self) -> None:
        """HAProxy's and the shim's certificates from meshca; ca.pem is the mesh's roots."""
        c = self.certs
        (c / "ca.pem").write_text(self.roots)
        dns = [SVC, SVC_JWT]
        for name, sid, names in (
            ("server-bundle.pem", API_ID, dns),
            ("client-bundle.pem", WEB_ID, []),
            ("loadgen-bundle.pem", LOADGEN_ID, []),
        ):
            (c / name).write_bytes(enroll_bundle(self.ca_home, self.ca_url, self.roots, sid, names))
            (c / name).chmod(0o600)

    def write_jwt_keys(self) -> None:
        """The issuer's ES256 key: PEM for HAProxy, a JWKS for the sidecar; test tokens."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (self.certs / "jwt.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (self.certs / "jwks.json").write_text(json.dumps(jwks_of(key)))
        now = int(time.time())
        self.one_token = sign_es256(key, claims_for(-1, now))
        self.check_token = sign_es256(key, claims_for(-3, now))  # not in the pool
        other = ec.generate_private_key(ec.SECP256R1())
        self.forged_token = sign_es256(other, claims_for(-2, now))  # right claims, wrong key

    def start_token_pool(
        self, pool: concurrent.futures.Executor
    ) -> list[concurrent.futures.Future]:
        """Sign the pool of distinct tokens in worker processes while the rest starts."""
        n, workers = self.args.tokens, 2
        now = int(time.time())
        chunk = -(-n // (workers * 4))
        return [
            pool.submit(make_tokens, self.key_pem, s, min(chunk, n - s), now)
            for s in range(0, n, chunk)
        ]

    def start_nginx(self) -> None:
        """The app: nginx, one worker, `ok\\n`, our own config, prefix and logs."""
        d = self.tmp / "nginx"
        d.mkdir()
        (self.port_app,) = free_ports(1)
        conf = f"""daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{self.port_app};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        log = d / "out.log"
        p = self.procs.spawn(
            ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
            log,
            core=1,
        )
        wait_port(self.port_app, log, p)

    def start_haproxies(self) -> None:
        """HAProxy inbound (both frontends) and outbound, one process each, on core 0."""
        p_in, p_in_jwt, p_out, p_out_jwt = free_ports(4)
        env = {
            "CERTS": str(self.certs),
            "P_APP": str(self.port_app),
            "P_IN": str(p_in),
            "P_IN_JWT": str(p_in_jwt),
            "P_OUT": str(p_out),
            "P_OUT_JWT": str(p_out_jwt),
            "SVC": SVC,
            "SVC_JWT": SVC_JWT,
            "JWT_ALG": "ES256",
            "JWT_ISS": ISSUER,
            "JWT_AUD": AUDIENCE,
        }
        for role, cfg, port in (("in", "inbound", p_in), ("out", "outbound", p_out)):
            log = self.tmp / f"haproxy-{role}.log"
            p = self.procs.spawn(
                ["haproxy", "-db", "-f", str(CONFIGS / f"haproxy-{cfg}.cfg")], log, env, core=0
            )
            wait_port(port, log, p)
            self.pids["haproxy"][role] = p.pid
            self.pids["haproxy"]["in_jwt"] = self.pids["haproxy"][
                "in"
            ]  # one process, two frontends
        self.ports_in = {"haproxy": (p_in, p_in_jwt)}
        self.ports_out = {"haproxy": {SVC: p_out, SVC_JWT: p_out_jwt}}

    def sidecar(
        self, name: str, sid: str, dns: list[str], extra: dict
    ) -> tuple[int, dict[str, int]]:
        """Start one sidecar (it enrolls itself); its PID and its listeners' ports."""
        d = self.tmp / name
        d.mkdir()
        (d / "ca-root.pem").write_text(self.roots)
        (d / "token").write_text(meshca_token(self.ca_home, sid, dns))
        doc = {
            "trust_domain": TRUST,
            "ca": {"url": self.ca_url, "bundle": "ca-root.pem", "token_file": "token"},
            "admin": {"listen": "127.0.0.1:0"},
            "health": {"listen": "127.0.0.1:0"},
            **extra,
        }
        if self.args.sidecar_access_log == "off":
            doc["access_log"] = {"mode": "off"}
        (d / "sidecar.yaml").write_text(yaml.safe_dump(doc))
        log = d / "out.log"
        p = self.procs.spawn(
            [
                self.py,
                "-m",
                "sidecar",
                "--log-level",
                "WARNING",
                "run",
                "--config",
                str(d / "sidecar.yaml"),
            ],
            log,
            core=0,
        )
        ports = {
            k: int(wait_for(log, rf"{k} listening on \S+://\S+:(\d+)", p))
            for k in ("admin", *(x for x in ("inbound", "outbound") if x in extra))
        }
        deadline = time.monotonic() + 30
        while True:
            status, _ = http_get(ports["admin"], "/ready", {})
            if status == 200:
                break
            if time.monotonic() > deadline or p.poll() is not None:
                raise BenchError(f"sidecar {name} never became ready; {log}:\n{tail(log)}")
            time.sleep(0.1)
        status, body = http_get(ports["admin"], "/status", {})
        mode = json.loads(body).get("request_path", "?") if status == 200 else "?"
        self.request_paths.add(mode)  # compiled, or plain Python (sidecar/compiled.py)
        return p.pid, ports

    def start_sidecars(self) -> None:
        """Inbound (mTLS only), inbound with JWT + policy, outbound to both: one process each."""
        app = f"127.0.0.1:{self.port_app}"
        dns = [SVC, SVC_JWT]
        in_pid, in_ports = self.sidecar(
            "sidecar-in", API_ID, dns, {"inbound": {"listen": "127.0.0.1:0", "app": app}}
        )
        policy = self.tmp / "policy.yaml"
        # Only requests with a verified token of our issuer: without one the sidecar answers
        # 401 jwt_required, as HAProxy's inbound_jwt frontend does (docs/sidecar.md).
        policy.write_text(
            yaml.safe_dump(
                {
                    "rules": [
                        {
                            "name": "bench-jwt",
                            "action": "ALLOW",
                            "from": {"request_principals": [f"{ISSUER}/*"]},
                        }
                    ]
                }
            )
        )
        jwt_pid, jwt_ports = self.sidecar(
            "sidecar-in-jwt",
            API_ID,
            dns,
            {
                "inbound": {"listen": "127.0.0.1:0", "app": app},
                "jwt": {
                    "issuers": [
                        {
                            "issuer": ISSUER,
                            "audiences": [AUDIENCE],
                            "jwks_file": str(self.certs / "jwks.json"),
                            "algorithms": ["ES256"],
                        }
                    ]
                },
                "policy": {"file": str(policy)},
            },
        )
        out_pid, out_ports = self.sidecar(
            "sidecar-out",
            WEB_ID,
            [],
            {
                "outbound": {
                    "listen": "127.0.0.1:0",
                    "services": {
                        SVC: {
                            "endpoints": [f"127.0.0.1:{in_ports['inbound']}"],
                            "identity": API_ID,
                        },
                        SVC_JWT: {
                            "endpoints": [f"127.0.0.1:{jwt_ports['inbound']}"],
                            "identity": API_ID,
                        },
                    },
                }
            },
        )
        self.pids["sidecar"] = {"in": in_pid, "in_jwt": jwt_pid, "out": out_pid}
        self.ports_in["sidecar"] = (in_ports["inbound"], jwt_ports["inbound"])
        port = out_ports["outbound"]
        self.ports_out["sidecar"] = {SVC: port, SVC_JWT: port}

    def start_pipes(self) -> None:
        """The bare uvloop TLS pipe (tlspipe.py), inbound and outbound, on core 0."""
        p_in, p_out = free_ports(2)
        c = self.certs
        for role, args in (
            (
                "in",
                [
                    "--listen", str(p_in), "--upstream", f"127.0.0.1:{self.port_app}",
                    "--server-bundle", str(c / "server-bundle.pem"), "--ca", str(c / "ca.pem"),
                ],
            ),
            (
                "out",
                [
                    "--listen", str(p_out), "--upstream", f"127.0.0.1:{p_in}",
                    "--client-bundle", str(c / "client-bundle.pem"), "--ca", str(c / "ca.pem"),
                    "--sni", SVC,
                ],
            ),
        ):  # fmt: skip
            log = self.tmp / f"pipe-{role}.log"
            p = self.procs.spawn([self.py, str(CONFIGS / "tlspipe.py"), *args], log, core=0)
            wait_for(log, r"tlspipe (listening)", p)
            self.pids[PIPE][role] = p.pid
        self.ports_in[PIPE] = (p_in, p_in)
        self.ports_out[PIPE] = {SVC: p_out}

    def start_shim(self) -> None:
        """The load generator's TLS shim (its client certificate), on core 1."""
        ports = free_ports(5)
        names = (
            "P_SHIM_HAPROXY_KA",
            "P_SHIM_HAPROXY_NEW",
            "P_SHIM_SIDECAR_KA",
            "P_SHIM_SIDECAR_NEW",
            "P_SHIM_PIPE_KA",
        )
        env = dict(zip(names, map(str, ports), strict=True))
        env |= {
            "CERTS": str(self.certs),
            "SVC": SVC,
            "P_HAPROXY_IN": str(self.ports_in["haproxy"][0]),
            "P_SIDECAR_IN": str(self.ports_in["sidecar"][0]),
            "P_PIPE_IN": str(self.ports_in[PIPE][0]),
        }
        log = self.tmp / "shim.log"
        p = self.procs.spawn(
            ["haproxy", "-db", "-f", str(CONFIGS / "haproxy-shim.cfg")], log, env, core=1
        )
        for port in ports:
            wait_port(port, log, p)
        self.shim = {
            ("haproxy", False): ports[0],
            ("haproxy", True): ports[1],
            ("sidecar", False): ports[2],
            ("sidecar", True): ports[3],
            (PIPE, False): ports[4],
        }

    def target(self, proxy: str, spec: PathSpec) -> tuple[int, dict[str, str]]:
        """The port wrk connects to and the headers it sends, for `spec` on `proxy`."""
        if spec.roles == ("in",):
            headers = {"Host": SVC}
            if spec.new_conn:
                headers["Connection"] = "close"
            return self.shim[(proxy, spec.new_conn)], headers
        svc = SVC_JWT if spec.jwt else SVC
        headers = {"Host": svc}
        if spec.jwt == "one":
            headers["Authorization"] = f"Bearer {self.one_token}"
        return self.ports_out[proxy][svc], headers

    # ---- checks

    def check(self) -> None:
        """Each path once for real on both proxies; BenchError naming every failure."""
        bad: list[str] = []

        def expect(what: str, got: tuple[int, bytes], status: int, body: bytes | None) -> None:
            if got[0] != status or (body is not None and got[1] != body):
                bad.append(f"{what}: expected {status}, got {got[0]} {got[1][:200]!r}")

        for proxy in PROXIES:
            for spec in (*PATHS, LATENCY):
                port, headers = self.target(proxy, spec)
                if spec.jwt == "each":
                    headers = {**headers, "Authorization": f"Bearer {self.check_token}"}
                expect(f"{proxy} {spec.title}", http_get(port, "/", headers), 200, BODY)
                if spec.new_conn and not closes_after_response(port, headers):
                    bad.append(f"{proxy} {spec.title}: the connection stayed open after the answer")
            port, headers = self.target(proxy, PATHS[2])
            headers.pop("Authorization")
            expect(f"{proxy} JWT path without a token", http_get(port, "/", headers), 401, None)
            headers["Authorization"] = f"Bearer {self.forged_token}"
            expect(
                f"{proxy} JWT path, token of another key", http_get(port, "/", headers), 401, None
            )
            for port in self.ports_in[proxy]:
                answer = tls_without_client_cert(port, self.certs / "ca.pem")
                if answer is not None:
                    bad.append(
                        f"{proxy} inbound :{port} served a client without a certificate: {answer!r}"
                    )
        for spec in PATHS:
            if spec.key in PIPE_PATHS:
                port, headers = self.target(PIPE, spec)
                expect(f"tlspipe {spec.title}", http_get(port, "/", headers), 200, BODY)
        expect("nginx directly", http_get(self.port_app, "/", {}), 200, BODY)
        if bad:
            raise BenchError("checks failed:\n  " + "\n  ".join(bad))
        print(
            "checks passed on both proxies: 200 and nginx's body on every path; on the JWT "
            "paths 401 without a token and with a token of another key; a client without a "
            "certificate refused by every inbound; the new-connection path closed after "
            "each answer",
            flush=True,
        )

    # ---- measuring

    def wrk(
        self,
        port: int,
        headers: dict[str, str],
        conns: int,
        seconds: float,
        proxy: str | None = None,
        tokens: bool = False,
    ) -> Run:
        """wrk --latency against 127.0.0.1:port (with the token script when `tokens`)."""
        threads = min(self.args.threads, conns)
        args = [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(conns),
            "-d",
            f"{seconds:g}s",
            "--latency",
            "--timeout",
            "5s",
        ]
        if self.args.pin:
            args = ["taskset", "-c", "1", *args]
        for k, v in headers.items():
            args += ["-H", f"{k}: {v}"]
        start = 0
        if tokens:
            assert proxy is not None
            start = self.token_cursor[proxy]
            args += ["-s", str(CONFIGS / "tokens.lua")]
        args.append(f"http://127.0.0.1:{port}/")
        if tokens:
            args += ["--", str(self.tmp / "tokens.txt"), str(start), str(threads)]
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"wrk did not finish: {args}\n{e.stdout!r}") from None
        if out.returncode != 0:
            raise BenchError(f"wrk failed ({out.returncode}): {out.stderr}\n{out.stdout}")
        run = parse_wrk(out.stdout)
        if tokens:
            m = re.search(r"tokens sent (\d+) of (\d+)", out.stdout)
            if not m:
                raise BenchError(f"tokens.lua printed no count:\n{out.stdout}")
            sent, total = int(m.group(1)), int(m.group(2))
            if sent > total:
                run.errors.append(
                    f"{sent} requests but {total} distinct tokens: tokens repeated (raise --tokens)"
                )
            self.token_cursor[proxy] = (start + sent) % total
        return run

    def measure(self, proxy: str, spec: PathSpec, seconds: float) -> Run:
        """One wrk run of `spec` on `proxy`, with the CPU of its proxy processes per request."""
        port, headers = self.target(proxy, spec)
        roles = {r: self.pids[proxy][r] for r in spec.roles}
        cpu0 = {r: cpu_seconds([pid]) for r, pid in roles.items()}
        run = self.wrk(port, headers, spec.conns, seconds, proxy, spec.jwt == "each")
        n = max(run.requests, 1)
        run.role_us = {r: (cpu_seconds([pid]) - cpu0[r]) * 1e6 / n for r, pid in roles.items()}
        run.cpu_us = sum(run.role_us.values())
        return run

    def rss(self) -> dict[str, float]:
        """VmRSS (MiB) of every proxy process under test."""
        return {
            f"{proxy} {role}": rss_mib(pid)
            for proxy in PROXIES
            for role, pid in self.pids[proxy].items()
            if not (proxy == "haproxy" and role == "in_jwt")  # the same process as "in"
        }

    def rss_split(self) -> dict[str, tuple[float, float]]:
        """(RssAnon, RssFile) MiB of every proxy process under test, keyed as `rss()`."""
        return {
            f"{proxy} {role}": rss_split_mib(pid)
            for proxy in PROXIES
            for role, pid in self.pids[proxy].items()
            if not (proxy == "haproxy" and role == "in_jwt")
        }

    def run(self) -> int:
        """Set up, check, warm up, measure the rounds, print; the exit status."""
        a = self.args
        with concurrent.futures.ProcessPoolExecutor(max_workers=2) as pool:
            self.write_jwt_keys()
            futures = self.start_token_pool(pool)
            self.start_ca()
            self.write_certs()
            self.start_nginx()
            self.start_haproxies()
            self.start_sidecars()
            self.start_pipes()
            self.start_shim()
            t0 = time.monotonic()
            with open(self.tmp / "tokens.txt", "wb") as f:
                for fut in futures:
                    f.write(fut.result())
        print(
            f"{a.tokens} distinct tokens ready ({time.monotonic() - t0:.1f} s after setup)",
            flush=True,
        )
        self.check()
        rss_idle = self.rss()
        chosen = [spec for spec in (*PATHS, LATENCY) if spec.key in a.paths]
        for spec in chosen:
            for proxy in PROXIES:
                run = self.measure(proxy, spec, a.warmup)
                if run.errors:
                    self.errors.append(f"warm-up {proxy} {spec.title}: {'; '.join(run.errors)}")
        piped = [spec for spec in chosen if spec.key in PIPE_PATHS]
        for spec in piped:
            run = self.measure(PIPE, spec, a.warmup)
            if run.errors:
                self.errors.append(f"warm-up tlspipe {spec.title}: {'; '.join(run.errors)}")
        rss_before = self.rss()
        results: dict[tuple[str, str], list[Run]] = {}
        for rnd in range(a.rounds):
            order = PROXIES if rnd % 2 == 0 else PROXIES[::-1]
            for spec in chosen:
                for proxy in order:
                    run = self.measure(proxy, spec, a.duration)
                    results.setdefault((proxy, spec.key), []).append(run)
                    self.report_run(rnd, proxy, spec.title, run)
            for spec in piped:
                run = self.measure(PIPE, spec, a.duration)
                results.setdefault((PIPE, spec.key), []).append(run)
                self.report_run(rnd, "tlspipe", spec.title, run)
            if LATENCY in chosen:
                run = self.wrk(self.port_app, {}, 1, a.duration)
                results.setdefault((DIRECT, DIRECT), []).append(run)
                self.report_run(rnd, "nginx", "directly, c=1", run)
        rss_after = self.rss()
        split = self.rss_split()
        self.summary(results, rss_idle, rss_before, rss_after, split)
        if self.errors:
            print("\nERRORS:", *self.errors, sep="\n  ")
            return 1
        return 0

    def report_run(self, rnd: int, proxy: str, title: str, run: Run) -> None:
        """Print one run's line; remember its errors."""
        print(
            f"round {rnd + 1} {proxy:8} {title[:60]:60} {run.rps:8.0f} req/s "
            f"p50 {run.p50_us:7.0f} us p99 {run.p99_us:7.0f} us "
            f"CPU {run.cpu_us:6.1f} us/req",
            flush=True,
        )
        if run.errors:
            self.errors.append(f"round {rnd + 1} {proxy} {title}: {'; '.join(run.errors)}")
            print(f"  ERROR: {'; '.join(run.errors)}", flush=True)

    def summary(
        self,
        results: dict[tuple[str, str], list[Run]],
        rss_idle: dict[str, float],
        rss_before: dict[str, float],
        rss_after: dict[str, float],
        split: dict[str, tuple[float, float]],
    ) -> None:
        """The target table, per-round ratios, req/s and latency, resident memory."""
        a = self.args

        def med(proxy: str, key: str, attr: str) -> float:
            return statistics.median(getattr(r, attr) for r in results[(proxy, key)])

        def per_role(proxy: str, key: str) -> str:
            runs = results[(proxy, key)]
            return " + ".join(
                f"{role} {statistics.median(r.role_us[role] for r in runs):.1f}"
                for role in runs[0].role_us
            )

        print(
            f"\n{a.rounds} rounds x {a.duration:g} s per path and proxy, medians; "
            f"wrk {a.threads} thread(s); "
            f"{'proxies on core 0, wrk/shim/nginx on core 1' if a.pin else 'unpinned'}; "
            f"{'proxies under SCHED_BATCH; ' if a.sched_batch else ''}"
            f"sidecar access log {a.sidecar_access_log}, HAProxy logging off; "
            f"sidecar request path {'/'.join(sorted(self.request_paths))}\n"
        )
        print("| path | HAProxy µs CPU/req | sidecar µs CPU/req | ratio | target | met |")
        print("| --- | --- | --- | --- | --- | --- |")
        measured = [spec for spec in PATHS if ("sidecar", spec.key) in results]
        for spec in measured:
            h, s = med("haproxy", spec.key, "cpu_us"), med("sidecar", spec.key, "cpu_us")
            ratio = h / s
            print(
                f"| {spec.title} | {h:.1f} | {s:.1f} | {ratio:.2f} | {spec.target} | "
                f"{'yes' if ratio >= spec.minimum else 'no'} |"
            )
        if (DIRECT, DIRECT) in results:
            direct = med(DIRECT, DIRECT, "p50_us")
            added = {p: (med(p, LATENCY.key, "p50_us") - direct) / 2 for p in PROXIES}
            base = added["haproxy"]
            lat_ratio = added["sidecar"] / base if base > 0 else float("inf")
            print(
                f"| c=1 added p50 latency per hop, µs (not CPU; sidecar / HAProxy) | "
                f"{added['haproxy']:.0f} | {added['sidecar']:.0f} | {lat_ratio:.2f}x | <= 2x | "
                f"{'yes' if lat_ratio <= 2 else 'no'} |"
            )
        sc = [k for k in rss_after if k.startswith("sidecar")]
        hp = [k for k in rss_after if k.startswith("haproxy")]
        worst = max(rss_after[k] for k in sc)
        growth = max(rss_after[k] - rss_before[k] for k in sc)
        flat = growth <= max(2.0, 0.05 * max(rss_before[k] for k in sc))
        print(
            f"| resident memory per proxy process, MiB after the rounds (max; growth over "
            f"the rounds) | {max(rss_after[k] for k in hp):.1f} | {worst:.1f} "
            f"({growth:+.1f}) | | <= 40 MiB, flat | "
            f"{'yes' if worst <= 40 and flat else 'no'} |"
        )

        floor = [spec for spec in measured if (PIPE, spec.key) in results]
        if floor:
            print(
                "\nThe floor: a bare uvloop TLS byte pipe (bench/peers/tlspipe.py, the same "
                "mTLS, no HTTP work), same run, same cores:\n"
            )
            print(
                "| path | tlspipe µs CPU/req | ratio to HAProxy | sidecar µs CPU/req | "
                "sidecar minus tlspipe (the HTTP work) |"
            )
            print("| --- | --- | --- | --- | --- |")
            for spec in floor:
                pipe, h = med(PIPE, spec.key, "cpu_us"), med("haproxy", spec.key, "cpu_us")
                sc = med("sidecar", spec.key, "cpu_us")
                print(
                    f"| {spec.title} | {pipe:.1f} | {h / pipe:.2f} | {sc:.1f} | {sc - pipe:.1f} |"
                )

        spread = []
        for spec in measured:
            pairs = zip(results[("haproxy", spec.key)], results[("sidecar", spec.key)], strict=True)
            spread.append(f"{spec.key} " + " ".join(f"{h.cpu_us / s.cpu_us:.2f}" for h, s in pairs))
        print(f"\nCPU ratio of each round (the proxies back to back): {'; '.join(spread)}")
        print("\n| path | proxy | req/s | p50 µs | p99 µs | µs CPU/req | per process |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for spec in (*PATHS, LATENCY):
            if ("sidecar", spec.key) not in results:
                continue
            for proxy in (*PROXIES, PIPE):
                if (proxy, spec.key) not in results:
                    continue
                print(
                    f"| {spec.title} | {proxy} | {med(proxy, spec.key, 'rps'):.0f} | "
                    f"{med(proxy, spec.key, 'p50_us'):.0f} | "
                    f"{med(proxy, spec.key, 'p99_us'):.0f} | "
                    f"{med(proxy, spec.key, 'cpu_us'):.1f} | {per_role(proxy, spec.key)} |"
                )
        if (DIRECT, DIRECT) in results:
            print(
                f"| nginx directly, c=1 | - | {med(DIRECT, DIRECT, 'rps'):.0f} | "
                f"{med(DIRECT, DIRECT, 'p50_us'):.0f} | {med(DIRECT, DIRECT, 'p99_us'):.0f} "
                "| - | - |"
            )

        print(
            "\n| process | RSS MiB at start | before the first round | after the last | change "
            "| after: anonymous + files |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for k in rss_after:
            anon, files = split[k]
            print(
                f"| {k} | {rss_idle[k]:.1f} | {rss_before[k]:.1f} | {rss_after[k]:.1f} | "
                f"{rss_after[k] - rss_before[k]:+.1f} | {anon:.1f} + {files:.1f} |"
            )
        print(
            "\n(sidecar in = inbound, mTLS only; in_jwt = inbound with JWT; out = outbound; "
            "HAProxy in serves both inbound frontends. Ratio = HAProxy µs / sidecar µs = "
            "requests per CPU-second, sidecar / HAProxy. HAProxy checks the server's DNS SAN "
            f"({SVC}), the sidecar its SPIFFE ID ({API_ID}); 'flat' = growth <= 2 MiB or 5 %. "
            "Anonymous memory is each process's own; file pages (code, read-only data) are "
            "shared by the processes that map the same files.)"
        )


# ---------------------------------------------------------------- HTTP probes


def http_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One plain-HTTP GET to 127.0.0.1:port: (status, body); (0, error) if it failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as e:
        return 0, repr(e).encode()
    finally:
        conn.close()


def closes_after_response(port: int, headers: dict[str, str]) -> bool:
    """Does the far end close the connection after answering this request (within 5 s)?"""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(f"GET / HTTP/1.1\r\n{head}\r\n".encode())
        try:
            while s.recv(65536):
                pass
        except TimeoutError:
            return False
    return True


def tls_without_client_cert(port: int, ca: Path) -> bytes | None:
    """What an inbound answers a TLS client without a certificate (None: it refused)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    try:
        with (
            socket.create_connection(("127.0.0.1", port), 10) as raw,
            ctx.wrap_socket(raw, server_hostname=SVC) as tls,
        ):
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {SVC}\r\nConnection: close\r\n\r\n".encode())
            data = tls.recv(4096)
    except (ssl.SSLError, OSError):
        return None
    return data if data.startswith(b"HTTP/1.1 2") else None if not data else data


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def temp_dir() -> Iterator[Path]:
    """A temp dir removed afterwards, whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="meshca-bench-peers-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    """Parse arguments, run the bench, return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    ap.add_argument("--duration", type=float, default=8, help="seconds per run (default 8)")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per path")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--tokens", type=int, default=150_000, help="distinct JWTs in the pool")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (2 rounds x 2 s)")
    keys = [spec.key for spec in (*PATHS, LATENCY)]
    ap.add_argument(
        "--paths",
        default=",".join(keys),
        help=f"comma-separated paths to measure, of {', '.join(keys)} (default all)",
    )
    ap.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the proxies to core 0 and the load to core 1",
    )
    ap.add_argument(
        "--sched-batch",
        action="store_true",
        help="run every proxy under test (both kinds alike) under SCHED_BATCH: a woken proxy "
        "does not preempt the other on its core (an experiment, not the default)",
    )
    ap.add_argument(
        "--sidecar-access-log",
        choices=("off", "all"),
        default="off",
        help="the sidecar's access log (HAProxy's is off); default off",
    )
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 2, 1
        args.tokens = min(args.tokens, 30_000)
    args.paths = [k.strip() for k in args.paths.split(",") if k.strip()]
    unknown = sorted(set(args.paths) - set(keys))
    if unknown or not args.paths:
        given = ", ".join(unknown) or "(none given)"
        ap.error(f"--paths: unknown {given}; known: {', '.join(keys)}")
    if args.tokens < 2 * TOKEN_CACHE:
        ap.error(f"--tokens must be at least {2 * TOKEN_CACHE} (the sidecar caches {TOKEN_CACHE})")
    tools = [*(["taskset"] if args.pin else []), *(["chrt"] if args.sched_batch else [])]
    for tool in ("haproxy", "nginx", "wrk", *tools):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} not found: `make bench-peers-deps` installs it")
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    started = time.monotonic()
    # SIGTERM (make interrupted, a CI timeout) unwinds like Ctrl-C: the proxies are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with temp_dir() as tmp:
        bench = Bench(args, tmp)
        try:
            status = bench.run()
        except BenchError as e:
            print(f"\nFAILED: {e}", file=sys.stderr)
            status = 2
        finally:
            bench.procs.stop_all()
    print(f"\n(bench-peers took {time.monotonic() - started:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
