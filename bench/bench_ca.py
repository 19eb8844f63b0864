"""`make bench-ca`: enrollments per second end to end over HTTPS, SQLite beside PostgreSQL.

End to end: a fresh CA pinned to one core, load from a client process pinned to the
other core. Every enrollment is a new TLS connection (a cold-starting pod), a join token
verified and consumed in the ledger, a CSR checked and a certificate signed and recorded,
exactly as in production. Three cases, with the same load generator and concurrency:

- sqlite: one `meshca serve --home` (the SQLite ledger, the embedded default);
- pg1: one `meshca serve --store-env` over a PostgreSQL of its own (tests/pgserver.py's
  initdb and postmaster, on this machine, unpinned; fsync and full_page_writes on);
- pg3: three such replicas over one database, the load spread round-robin over them.

Rounds of the cases are interleaved (round 1 of each, then round 2 of each...), so that the
machine's drift hits every case alike. After each round every enrollment must have been
answered 200 and the ledger must hold exactly the certificates issued, else the bench fails.
Raw: the same signing work in-process, without HTTP or TLS.

Prints medians of several rounds; the machine is noisy, so compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca import pki, store
from meshca.authority import Authority, init_ca, load_ec_key
from meshca.spiffe import SpiffeId
from meshca.tokens import JoinTokens

CASES = {
    "sqlite": "SQLite, 1 replica",
    "pg1": "PostgreSQL, 1 replica",
    "pg3": "PostgreSQL, 3 replicas",
}
STORE_ENV = "MESHCA_BENCH_STORE"
TRUST_DOMAIN = "cluster.local"
# tests/pgserver.py starts postgres with these off for test speed; a CA's ledger in
# production has them on. They are set on the postmaster's command line, which outranks
# ALTER SYSTEM (postgresql.auto.conf), so the server is restarted with them on instead.
DURABLE_CHECK = (
    "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings "
    "WHERE name IN ('fsync', 'full_page_writes', 'synchronous_commit')"
)
DURABLE_EXPECTED = "fsync=on full_page_writes=on synchronous_commit=on"
JOIN_CERTS = "SELECT count(*) FROM certificates WHERE credential = 'join_token'"


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


def _stat_fields(pid: int) -> list[str]:
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PG_ROLES = ("backends", "walwriter", "checkpointer", "other")


def pg_role(pid: int, root: int) -> str:
    """What a postgres process does, from its title ("postgres: walwriter", or "postgres:
    USER DB HOST(PORT) STATE" for a backend serving a connection)."""
    if pid == root:
        return "other"  # the postmaster
    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    title = title.removeprefix("postgres: ").strip()
    if "(" in title:
        return "backends"
    return title if title in PG_ROLES else "other"


def pg_cpu(root: int) -> dict[int, tuple[str, float]]:
    """(role, CPU seconds) of the postmaster `root` and of each of its children, by pid."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = _stat_fields(pid)
            if pid == root or int(fields[1]) == root:
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                out[pid] = (pg_role(pid, root), cpu)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return out


def tail(path: Path, n: int = 20) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:]) or "(nothing)"


def start_ca(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`meshca serve ARGS` on a free loopback port, pinned to core 0; (process, its URL)."""
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [
                *taskset(0),
                sys.executable,
                "-m",
                "meshca",
                "--log-level",
                "WARNING",
                "serve",
                *args,
                "--listen",
                "127.0.0.1:0",
                "--rate",
                "100000",
                "--burst",
                "100000",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    for line in proc.stdout:
        if "serving on " in line:
            return proc, line.split("serving on ", 1)[1].strip()
    proc.kill()
    proc.wait()
    raise SystemExit(f"meshca serve {' '.join(args)} did not start; its log:\n{tail(log)}")


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Case:
    """One way of running the CA under test: its processes, how to mint join tokens for
    it, how to count what its ledger recorded."""

    key: str
    procs: list[subprocess.Popen]
    urls: list[str]
    bundle: str
    mint: Callable[[list[SpiffeId]], list[str]]
    ledger_count: Callable[[], int]
    close: Callable[[], None] = lambda: None
    results: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return CASES[self.key]


def mint_tokens(join: JoinTokens, ledger: store.LedgerStore, ids: list[SpiffeId]) -> list[str]:
    """Join tokens for `ids`, recorded in `ledger` (half an hour each)."""
    ttl = dt.timedelta(minutes=30)
    return [join.mint_recorded(ledger, sid, store.utcnow(), ttl).token for sid in ids]


def sqlite_case(home: Path, log: Path) -> Case:
    authority = Authority.load(home)
    join = JoinTokens(load_ec_key(home / store.TOKEN_KEY_FILE), authority.trust_domain)
    proc, url = start_ca(["--home", str(home)], log)

    def mint(ids: list[SpiffeId]) -> list[str]:
        ledger = store.Ledger(home / store.LEDGER_FILE)
        try:
            return mint_tokens(join, ledger, ids)
        finally:
            ledger.close()

    def count() -> int:
        db = sqlite3.connect(f"file:{home / store.LEDGER_FILE}?mode=ro", uri=True)
        try:
            return db.execute(JOIN_CERTS).fetchone()[0]
        finally:
            db.close()

    return Case("sqlite", [proc], [url], authority.bundle_pem(), mint, count)


def pg_case(key: str, pg: Any, database: str, kek: Path, replicas: int, tmp: Path) -> Case:
    """`replicas` CA processes over the database `database` of `pg` (a PgServer), started
    one after the other with --migrate --init-if-missing (the first makes the CA)."""
    from meshca.kek import load_kek
    from meshca.pgstate import PgState

    pg.psql(f"CREATE DATABASE {database}", dbname="postgres")
    dsn = pg.dsn.rsplit("/", 1)[0] + "/" + database
    env = {**os.environ, STORE_ENV: dsn}
    store_args = ["--store-env", STORE_ENV, "--kek-file", str(kek)]
    procs: list[subprocess.Popen] = []
    st = None
    try:
        urls = []
        for i in range(replicas):
            name = f"{key}-r{i}"
            proc, url = start_ca(
                [*store_args, "--migrate", "--init-if-missing", "--replica-name", name],
                tmp / f"{name}.log",
                env,
            )
            procs.append(proc)
            urls.append(url)
        st = PgState(dsn, load_kek(kek))
        ledger = st.ledger()
        join = JoinTokens(st.key(store.TOKEN_KEY_FILE), TRUST_DOMAIN)
        bundle = Authority.load(st).bundle_pem()
    except BaseException:
        stop_all(procs)
        if st is not None:
            st.close()
        raise

    def mint(ids: list[SpiffeId]) -> list[str]:
        return mint_tokens(join, ledger, ids)

    def close() -> None:
        ledger.close()
        st.close()

    def count() -> int:
        return int(pg.psql(JOIN_CERTS, dbname=database))

    return Case(key, procs, urls, bundle, mint, count, close)


def check_durable(pg: Any) -> None:
    """Fail unless `pg` (a PgServer) runs with fsync and full_page_writes on."""
    got = pg.psql(DURABLE_CHECK, dbname="postgres")
    if got != DURABLE_EXPECTED:
        raise SystemExit(f"postgres runs with {got!r}, not {DURABLE_EXPECTED!r}")


async def client_run(
    urls: list[str], bundle: str, jobs: list[tuple[int, str, str]], concurrency: int
) -> dict:
    import aiohttp

    ctx = ssl.create_default_context(cadata=bundle)
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ok = [0] * len(urls)
    # force_close: one TLS handshake per enrollment, as a cold-starting pod does.
    conn = aiohttp.TCPConnector(ssl=ctx, force_close=True, limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            while not queue.empty():
                target, token, csr = queue.get_nowait()
                t = time.perf_counter()
                try:
                    async with session.post(
                        urls[target] + "/v1/certificates",
                        json={"csr": csr},
                        headers={"Authorization": f"Bearer {token}"},
                    ) as r:
                        await r.read()
                        status = str(r.status)
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    status = type(e).__name__
                if status == "200":
                    ok[target] += 1
                else:
                    errors[status] = errors.get(status, 0) + 1
                latencies.append(time.perf_counter() - t)

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()
    return {
        "n": len(jobs),
        "wall": wall,
        "cpu": cpu,
        "rate": len(jobs) / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
        "ok_by_url": ok,
    }


def client_main() -> None:
    """Run as the load-generating child: read the job from stdin, print JSON results."""
    job = json.load(sys.stdin)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    res = runner(client_run(job["urls"], job["bundle"], job["jobs"], job["concurrency"]))
    print(json.dumps(res))


def run_round(case: Case, rnd: int, csrs: list[str], concurrency: int, pg_root: int | None) -> None:
    """One round of len(csrs) enrollments against `case`, round-robin over its URLs;
    appends the result to case.results, or exits when anything was refused or lost."""
    ids = [
        SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/{case.key}-{rnd}-{i}")
        for i in range(len(csrs))
    ]
    tokens = case.mint(ids)
    jobs = [
        (i % len(case.urls), tok, csr)
        for i, (tok, csr) in enumerate(zip(tokens, csrs, strict=True))
    ]
    job = {"urls": case.urls, "bundle": case.bundle, "jobs": jobs, "concurrency": concurrency}
    ca0 = [cpu_seconds(p.pid) for p in case.procs]
    pg0 = pg_cpu(pg_root) if pg_root else {}
    out = subprocess.run(
        [*taskset(1), sys.executable, __file__, "--client"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
    )
    ca = [cpu_seconds(p.pid) - c for p, c in zip(case.procs, ca0, strict=True)]
    # A backend that started during the round counts whole; one that ended is missed
    # (the CA's pooled connections live through the run).
    pg = dict.fromkeys(PG_ROLES, 0.0)
    for pid, (role, cpu) in (pg_cpu(pg_root) if pg_root else {}).items():
        pg[role] += cpu - pg0.get(pid, (role, 0.0))[1]
    if out.returncode != 0:
        raise SystemExit(f"FAILED: the load generator exited {out.returncode}:\n{out.stderr}")
    res = json.loads(out.stdout)
    n = res["n"]
    res.update(
        ca_ms=sum(ca) / n * 1000,
        pg_ms=sum(pg.values()) / n * 1000,
        pg_roles_ms={role: cpu / n * 1000 for role, cpu in pg.items()},
        client_ms=res["cpu"] / n * 1000,
        ca_busy=sum(ca) / res["wall"],
        client_busy=res["cpu"] / res["wall"],
    )
    case.results.append(res)
    spread = "/".join(str(k) for k in res["ok_by_url"])
    print(
        f"{case.key:6} round {rnd + 1}: {res['rate']:5.0f} enrollments/s  "
        f"p50 {res['p50_ms']:5.1f} ms  p99 {res['p99_ms']:6.1f} ms  "
        f"CPU ms each: CA {res['ca_ms']:.2f} (core 0 {res['ca_busy']:4.0%} busy)  "
        f"PostgreSQL {res['pg_ms']:.2f}  "
        f"client {res['client_ms']:.2f} (core 1 {res['client_busy']:4.0%} busy)  "
        f"200s per replica {spread}",
        flush=True,
    )
    if res["errors"]:
        raise SystemExit(
            f"FAILED: {case.label}: not every enrollment answered 200: {res['errors']}"
        )
    expected = n * (rnd + 1)
    recorded = case.ledger_count()
    if recorded != expected:
        raise SystemExit(
            f"FAILED: {case.label}: the ledger holds {recorded} join-token certificates, "
            f"{expected} were issued"
        )
    if len(case.urls) > 1 and min(res["ok_by_url"]) == 0:
        raise SystemExit(f"FAILED: {case.label}: a replica served nothing ({spread})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, help="enrollments per round (default 2000; --quick 300)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3; --quick 1)")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"which cases to run, comma-separated (default {','.join(CASES)})",
    )
    ap.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main()
        return
    n = args.n or (300 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown or not keys:
        ap.error(f"--cases: unknown {unknown}; choose from {','.join(CASES)}")
    keys = [k for k in CASES if k in keys]  # sqlite first: the others are compared to it

    tmp = Path(tempfile.mkdtemp(prefix="meshca-bench-"))
    try:
        home = tmp / "ca"
        init_ca(home)
        print(f"making {n} CSRs ...", flush=True)
        csrs = make_csrs(n)
        sign_rate, full_rate = raw_rate(home, csrs[: min(1000, n)])
        print(f"raw signing (issue() only, one core):              {sign_rate:8.0f} certs/s")
        print(f"in-process enrollment work (CSR check+sign+ledger): {full_rate:8.0f} /s")
        with pg_cluster(tmp, any(k.startswith("pg") for k in keys)) as pg:
            cases: list[Case] = []
            try:
                if pg is not None:
                    print(
                        f"PostgreSQL {pg.psql('SHOW server_version', dbname='postgres')} "
                        f"on 127.0.0.1, unpinned: {pg.psql(DURABLE_CHECK, dbname='postgres')}",
                        flush=True,
                    )
                    kek = tmp / "kek"
                    kek.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
                for key in keys:
                    if key == "sqlite":
                        cases.append(sqlite_case(home, tmp / "sqlite.log"))
                    else:
                        replicas = int(key[2:])
                        cases.append(pg_case(key, pg, f"bench_{key}", kek, replicas, tmp))
                for rnd in range(rounds):
                    for case in cases:
                        run_round(case, rnd, csrs, args.concurrency, pg.pid if pg else None)
            finally:  # the CA processes go before their database does
                for case in cases:
                    stop_all(case.procs)
                    case.close()
        report(cases, args.concurrency, n, rounds, sign_rate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def pg_cluster(tmp: Path, wanted: bool) -> Iterator[Any]:
    """tests/pgserver.py's PostgreSQL (a PgServer), made durable; None when not wanted."""
    if not wanted:
        yield None
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from pgserver import pg_binaries, pg_server

    if pg_binaries() is None:
        raise SystemExit("PostgreSQL is not installed (make deps installs it)")
    with pg_server(tmp / "pglog", durable=True) as pg:
        check_durable(pg)
        yield pg


def report(cases: list[Case], concurrency: int, n: int, rounds: int, sign_rate: float) -> None:
    def med(case: Case, key: str) -> float:
        return statistics.median(r[key] for r in case.results)

    pgs = [c for c in cases if c.key != "sqlite"]
    pinned = "CA processes pinned to core 0, the client to core 1" if taskset(0) else "unpinned"
    print(
        f"\nend to end over HTTPS: {n} enrollments a round, median of {rounds} round(s), "
        f"{concurrency} concurrent, a new TLS connection each;\n{pinned}"
        + (", PostgreSQL unpinned (fsync on)" if pgs else "")
        + "; every enrollment answered 200 and was recorded once in the ledger\n"
    )
    base = next((c for c in cases if c.key == "sqlite"), None)
    print(
        f"{'case':24} {'enroll/s':>8} {'(range)':>11} {'vs SQLite':>9} {'p99 ms':>6}   "
        f"{'CPU ms per enrollment: CA':>25} {'PG':>5} {'client':>6} {'total':>6}"
    )
    for case in cases:
        rate = med(case, "rate")
        rates = [r["rate"] for r in case.results]
        ratio = f"{rate / med(base, 'rate'):.2f}" if base else "-"
        ca, pg, client = med(case, "ca_ms"), med(case, "pg_ms"), med(case, "client_ms")
        print(
            f"{case.label:24} {rate:8.0f} {f'({min(rates):.0f}-{max(rates):.0f})':>11} "
            f"{ratio:>9} {med(case, 'p99_ms'):6.0f}   {ca:25.2f} {pg:5.2f} "
            f"{client:6.2f} {ca + pg + client:6.2f}"
        )
    best = max(med(c, "rate") for c in cases)
    print(
        "\nCA: the meshca serve processes (all replicas); PG: the postmaster and its children; "
        "client: the load\ngenerator (TLS handshakes, JSON). The 2 cores give "
        f"{2000 / best:.2f} ms of CPU per enrollment at the best rate."
    )
    for case in pgs:
        roles = {
            role: statistics.median(r["pg_roles_ms"][role] for r in case.results)
            for role in PG_ROLES
        }
        print(
            f"{case.label}: PostgreSQL CPU ms per enrollment by process: "
            + ", ".join(f"{role} {ms:.2f}" for role, ms in roles.items())
        )
    if any(c.key == "pg3" for c in cases):
        print(
            "\nPostgreSQL, 3 replicas: on this 2-core machine the three replicas share core 0, "
            "and PostgreSQL and the client\nshare the cores too: this case shows that the load "
            "spreads and each enrollment is recorded once, and what\ncoordination costs. It "
            "does not measure scale-out (replicas on machines of their own would add cores)."
        )
    if base:
        rate, ca = med(base, "rate"), med(base, "ca_ms")
        print(
            f"\nSQLite: CA CPU per enrollment {ca:.2f} ms (one core's ceiling {1000 / ca:.0f}/s); "
            f"10,000-pod cold start {10000 / rate:.0f} s; end-to-end / raw signing "
            f"{rate / sign_rate:.2f}"
        )
    for case in pgs:
        ca = med(case, "ca_ms")
        print(
            f"{case.label}: CA CPU per enrollment {ca:.2f} ms (one core's ceiling "
            f"{1000 / ca:.0f}/s); 10,000-pod cold start {10000 / med(case, 'rate'):.0f} s"
        )


if __name__ == "__main__":
    main()
