"""Three `meshca serve` replicas over one real PostgreSQL (Debian's, started by the test):
every replica serves every request, join tokens are single-use across them, a rotation
taken through one is served by the others within the reload interval, sidecars listing all
three keep renewing while one is SIGKILLed, and a database outage is a 503 everywhere
(nothing issued) until it is back."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import Lines, serve_meshca, stop_process, tail
from mesh import admin_get, sidecar_config, start_sidecar
from pgserver import PgServer
from pgserver import dsn_fixture as dsn_fixture  # noqa: F401 (the fixture `dsn`)
from pgserver import shared_pg_fixture as shared_pg_fixture  # noqa: F401 (`shared_pg`)

from meshca.kek import load_kek
from meshca.pgstate import PgState
from meshca.spiffe import SpiffeId
from meshca.store import TOKEN_KEY_FILE, utcnow
from meshca.tokens import JoinTokens

pytestmark = pytest.mark.e2e

ROTATOR = "spiffe://cluster.local/ns/mesh-system/sa/meshca-rotator"
STORE_ENV = "MESHCA_TEST_STORE"


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen
    url: str
    err: Lines
    out: Lines
    bundle: Path  # what `sidecar_config` reads as `ca.bundle`
    home: Path = field(default_factory=Path)

    def stop(self) -> None:
        stop_process(self.proc)

    @property
    def log(self) -> str:
        return tail(self.err.lines, 60)


@dataclass
class Cluster:
    pg: PgServer
    kek: Path
    root: Path
    replicas: list[Replica]
    bundle: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, STORE_ENV: self.pg.dsn, "PYTHONUNBUFFERED": "1"}

    def store_args(self) -> list[str]:
        return ["--store-env", STORE_ENV, "--kek-file", str(self.kek)]

    def meshca(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "meshca", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"meshca {args[0]} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def tokens(self, ids: list[str]) -> list[str]:
        """Join tokens minted and recorded in the shared ledger (as `meshca token` does)."""
        st = PgState(self.pg.dsn, load_kek(self.kek))
        ledger = st.ledger()
        try:
            minter = JoinTokens(st.key(TOKEN_KEY_FILE), "cluster.local")
            ttl = dt.timedelta(minutes=30)
            return [
                minter.mint_recorded(ledger, SpiffeId.parse(sid), utcnow(), ttl).token
                for sid in ids
            ]
        finally:
            ledger.close()
            st.close()

    def ledger(self, sql: str) -> str:
        return self.pg.psql(sql)


def start_replica(cluster_env: dict[str, str], root: Path, name: str, *extra: str) -> Replica:
    args = ["--store-env", STORE_ENV, "--kek-file", str(root / "kek"), "--replica-name", name]
    proc, url, err, out = serve_meshca(
        [*args, "--admin-id", ROTATOR, *extra], cluster_env, timeout=60, what=name
    )
    return Replica(name, proc, url, err, out, root / "bundle.pem")


@pytest.fixture
def cluster(shared_pg: PgServer, dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    """An empty database, then three replicas started at once, each with --migrate and
    --init-if-missing (as a Deployment's first rollout does): they make one CA."""
    (tmp_path / "kek").write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    env = {**os.environ, STORE_ENV: shared_pg.dsn, "PYTHONUNBUFFERED": "1"}
    replicas: list[Replica] = []
    try:
        with ThreadPoolExecutor(3) as pool:
            starts = [
                pool.submit(
                    start_replica,
                    env,
                    tmp_path,
                    f"r{i}",
                    "--migrate",
                    "--init-if-missing",
                    "--reload-interval",
                    "10",  # polling is the fallback; a change must arrive by NOTIFY
                )
                for i in range(3)
            ]
            for s in starts:
                replicas.append(s.result())
        c = Cluster(shared_pg, tmp_path / "kek", tmp_path, replicas, tmp_path / "bundle.pem")
        c.bundle.write_text(c.meshca("bundle", *c.store_args()).stdout)
        yield c
    finally:
        for r in replicas:
            r.stop()


# -- clients ---------------------------------------------------------------------------


def new_csr() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def call(
    c: Cluster,
    r: Replica,
    method: str,
    path: str,
    body: dict | None = None,
    token: str | None = None,
    cert: tuple[Path, Path] | None = None,
) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(c.bundle))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    host, _, port = r.url.removeprefix("https://").rpartition(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers=headers)  # fmt: skip
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def enroll(c: Cluster, r: Replica, token: str) -> tuple[int, dict]:
    _, csr = new_csr()
    return call(c, r, "POST", "/v1/certificates", {"csr": csr}, token=token)


def admin_files(c: Cluster) -> tuple[Path, Path]:
    """A certificate of the rotator identity (an admin of every replica)."""
    key, csr = new_csr()
    status, doc = call(c, c.replicas[0], "POST", "/v1/certificates", {"csr": csr},
                       token=c.tokens([ROTATOR])[0])  # fmt: skip
    assert status == 200, doc
    chain, keyfile = c.root / "admin.pem", c.root / "admin.key"
    chain.write_text(doc["certificate_chain"])
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return chain, keyfile


def wait_for(what: str, check, timeout: float, logs: list[Replica]) -> float:
    """Poll `check` until true; seconds it took. A timeout shows the replicas' logs."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(
        f"{what}: not within {timeout:g} s\n"
        + "\n".join(f"--- last lines of {r.name}'s log:\n{r.log}" for r in logs)
    )


# -- the checks ------------------------------------------------------------------------


def test_enrollments_spread_over_all_replicas_are_each_recorded_once(cluster: Cluster) -> None:
    c = cluster
    # One CA was made, though three replicas started at once with --init-if-missing.
    assert c.ledger("SELECT count(*) FROM ca_state") == "1"
    assert c.ledger("SELECT count(*) FROM events WHERE kind = 'init'") == "1"
    ids = [f"spiffe://cluster.local/ns/load/sa/w{i}" for i in range(45)]
    tokens = c.tokens(ids)
    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(lambda i: enroll(c, c.replicas[i % 3], tokens[i]), range(len(ids))))
    assert [s for s, _ in answers] == [200] * len(ids), [d for s, d in answers if s != 200]
    serials = [d["serial"] for _, d in answers]
    assert len(set(serials)) == len(ids)
    rows = c.ledger(
        "SELECT string_agg(spiffe_id || ' ' || serial, ',' ORDER BY spiffe_id) FROM certificates "
        "WHERE credential = 'join_token'"
    ).split(",")
    assert sorted(rows) == sorted(f"{sid} {s}" for sid, s in zip(ids, serials, strict=True))
    used = c.ledger("SELECT count(*) FROM join_tokens WHERE used_at IS NOT NULL")
    assert used == str(len(ids))
    # All three chain to the one CA: the same issuer for every leaf.
    assert c.ledger("SELECT count(DISTINCT issuer) FROM certificates") == "1"
    # `meshca status` names the store, its schema and the three replicas.
    doc = json.loads(c.meshca("status", *c.store_args(), "--json").stdout)
    store = doc["store"]
    assert store["kind"] == "postgresql" and store["schema_version"] == 2
    assert c.pg.password not in json.dumps(doc)
    seen = {r["name"]: r for r in store["replicas"]}
    assert set(seen) == {"r0", "r1", "r2"}
    assert {r["url"] for r in seen.values()} == {r.url for r in c.replicas}
    human = c.meshca("status", *c.store_args()).stdout
    assert "schema version 2" in human and all(f"r{i}" in human for i in range(3))


def test_one_join_token_sent_to_all_three_at_once_gives_one_certificate(cluster: Cluster) -> None:
    c = cluster
    for round_ in range(5):
        sid = f"spiffe://cluster.local/ns/race/sa/r{round_}"
        (token,) = c.tokens([sid])
        start = threading.Barrier(3)

        def send(r: Replica, token: str = token, start: threading.Barrier = start):
            start.wait(timeout=10)
            return enroll(c, r, token)

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(send, c.replicas))
        statuses = sorted(s for s, _ in answers)
        assert statuses == [200, 401, 401], answers
        assert all(d["error"] == "invalid_token" for s, d in answers if s == 401)
        rows = c.ledger(f"SELECT count(*) FROM certificates WHERE spiffe_id = '{sid}'")
        assert rows == "1"


def test_a_rotation_through_one_replica_is_served_by_the_others(cluster: Cluster) -> None:
    c = cluster
    cert = admin_files(c)

    def sequence(r: Replica) -> int:
        status, doc = call(c, r, "GET", "/v1/bundle")
        assert status == 200, doc
        return int(doc["sequence"])

    before = [sequence(r) for r in c.replicas]
    assert before == [1, 1, 1]
    out = c.meshca(
        "rotate", "--ca-url", c.replicas[0].url, "--ca-bundle", str(c.bundle),
        "--cert", str(cert[0]), "--key", str(cert[1]), "--start-root-rotation", "--json",
    )  # fmt: skip
    step = json.loads(out.stdout)
    assert step["action"] == "prepare_root" and step["bundle_sequence"] == 2
    # B and C poll only every 10 s (--reload-interval 10): the NOTIFY must bring it sooner.
    took = wait_for(
        "the new root served by B and C",
        lambda: all(sequence(r) == 2 for r in c.replicas[1:]),
        5,
        c.replicas,
    )
    assert took < 2.0, f"B and C served the new bundle only after {took:.2f} s"
    bundles = {call(c, r, "GET", "/v1/bundle")[1]["roots"] for r in c.replicas}
    assert len(bundles) == 1 and bundles.pop().count("BEGIN CERTIFICATE") == 2

    # Two rotations at once, through two replicas: one runs after the other (the advisory
    # lock), and all three end in one state, issuing from the same intermediate.
    def force(r: Replica) -> dict:
        proc = c.meshca(
            "rotate", "--ca-url", r.url, "--ca-bundle", str(c.bundle), "--cert", str(cert[0]),
            "--key", str(cert[1]), "--force-intermediate", "--json",
        )  # fmt: skip
        return json.loads(proc.stdout)

    with ThreadPoolExecutor(2) as pool:
        steps = list(pool.map(force, c.replicas[1:]))
    assert [s["action"] for s in steps] == ["rotate_intermediate"] * 2
    assert steps[0]["intermediate"] != steps[1]["intermediate"]
    revision = c.ledger("SELECT revision FROM ca_state")
    assert revision == "4"  # init, prepare, and the two intermediates: no step lost
    last = c.ledger(
        "SELECT detail->>'intermediate' FROM events WHERE kind = 'rotate_intermediate' "
        "ORDER BY id DESC LIMIT 1"
    )

    def issuers() -> set[str]:
        for r in c.replicas:
            status, doc = enroll(c, r, c.tokens(["spiffe://cluster.local/ns/x/sa/y"])[0])
            assert status == 200, doc
        rows = c.ledger(
            "SELECT string_agg(DISTINCT issuer, ',') FROM certificates WHERE spiffe_id = "
            "'spiffe://cluster.local/ns/x/sa/y'"
        )
        c.ledger("DELETE FROM certificates WHERE spiffe_id = 'spiffe://cluster.local/ns/x/sa/y'")
        return set(rows.split(","))

    wait_for("every replica issuing from the last intermediate",
             lambda: issuers() == {last}, 5, c.replicas)  # fmt: skip


def test_a_replica_killed_under_load_costs_no_renewal(cluster: Cluster) -> None:
    c = cluster
    a, b, cc = c.replicas
    orders = [[b, a, cc], [b, cc, a], [a, b, cc]]  # two sidecars ask B first
    sidecars = []
    try:
        for i, order in enumerate(orders):
            sid = f"spiffe://cluster.local/ns/default/sa/s{i}"
            cfg = sidecar_config(
                c.root, f"s{i}", order[0], sid, token=c.tokens([sid])[0],  # type: ignore[arg-type]
                ca_extra={"bundle_poll": 0.5, "retry_max": 1},
            )  # fmt: skip
            doc = yaml.safe_load(cfg.read_text())
            doc["ca"]["url"] = [r.url for r in order]
            cfg.write_text(yaml.safe_dump(doc))
            sidecars.append(start_sidecar(cfg))
        load_tokens = c.tokens([f"spiffe://cluster.local/ns/load/sa/k{i}" for i in range(60)])
        stop = threading.Event()
        load_results: list[int] = []

        def load() -> None:
            for i, token in enumerate(load_tokens):
                if stop.is_set():
                    break
                r = (a, cc)[i % 2]  # the load itself avoids B: it measures the sidecars
                load_results.append(enroll(c, r, token)[0])

        loader = threading.Thread(target=load)
        loader.start()
        renewals: list[tuple[int, dict]] = []
        for round_ in range(6):
            if round_ == 2:
                b.proc.kill()  # SIGKILL, in the middle of the load
                b.proc.wait(10)
            for s in sidecars:
                renewals.append(admin_get(s, "/rotate", method="POST", timeout=60))
        stop.set()
        loader.join(60)
        failed = [d for s, d in renewals if s != 200]
        assert not failed, failed
        assert len(renewals) == 18
        assert set(load_results) == {200}, load_results
        serials = {d["serial"] for _, d in renewals}
        recorded = c.ledger(
            "SELECT string_agg(serial, ',') FROM certificates WHERE credential = 'renewal'"
        ).split(",")
        assert serials <= set(recorded)
    finally:
        for s in sidecars:
            s.stop()


def test_the_database_stopped_is_503_everywhere_and_nothing_issued(cluster: Cluster) -> None:
    c = cluster
    tokens = c.tokens([f"spiffe://cluster.local/ns/db/sa/t{i}" for i in range(3)])
    workload_rows = "SELECT count(*) FROM certificates WHERE credential != 'ca_server'"
    issued_before = int(c.ledger(workload_rows))

    def during_outage(r: Replica, token: str) -> tuple[int, dict, int, int]:
        status, doc = enroll(c, r, token)
        return status, doc, call(c, r, "GET", "/readyz")[0], call(c, r, "GET", "/healthz")[0]

    c.pg.stop("fast")
    try:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(during_outage, c.replicas, tokens))
    finally:
        c.pg.start()
    for r, (status, doc, ready, live) in zip(c.replicas, answers, strict=True):
        assert status == 503, (r.name, doc)
        assert doc["error"] == "unavailable" and "certificate_chain" not in doc
        assert c.pg.password not in json.dumps(doc)
        assert ready == 503, r.name
        assert live == 200, r.name  # liveness does not restart a replica for the database
    # Every replica resumes (the pools reconnect), and the tokens were not spent.
    for r, token in zip(c.replicas, tokens, strict=True):
        wait_for(f"{r.name} ready again", lambda r=r: call(c, r, "GET", "/readyz")[0] == 200,
                 20, [r])  # fmt: skip
        status, doc = enroll(c, r, token)
        assert status == 200, (r.name, doc)
    # Exactly the 3 enrollments after the outage: nothing was issued during it.
    assert int(c.ledger(workload_rows)) == issued_before + 3
    for i in range(3):
        sid = f"spiffe://cluster.local/ns/db/sa/t{i}"
        assert c.ledger(f"SELECT count(*) FROM certificates WHERE spiffe_id = '{sid}'") == "1"
    for r in c.replicas:
        assert c.pg.password not in "".join(r.err.lines)
