"""A sidecar whose `ca.url` lists several CA replicas fails over between them: a replica
that cannot be reached (SIGKILLed) or answers 429/5xx is passed over for the next, for
renewals and for the trust-bundle poll; the replicas behind one name (a headless Service,
one address each) are tried address by address. The replicas here are `meshca serve`
processes on one state directory (the SQLite ledger is shared on one machine; across
machines that is what the PostgreSQL store is for)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import yaml
from helpers import mint_token, run_meshca, start_ca, workload_certs
from mesh import admin_get, sidecar_config, start_sidecar

from meshca.client import EnrollmentClient, fetch_bundle, new_key_and_csr, private_key_pem

WEB = "spiffe://cluster.local/ns/default/sa/web"
SERVICE = "meshca.mesh-system.svc"  # a name in the CA's serving certificate
CA_ID = "spiffe://cluster.local/ns/mesh-system/sa/meshca"


def _sidecar(root, ca, urls: list[str], name: str = "web"):
    cfg = sidecar_config(root, name, ca, WEB, ca_extra={"bundle_poll": 0.5, "retry_max": 1})
    doc = yaml.safe_load(cfg.read_text())
    doc["ca"]["url"] = urls
    cfg.write_text(yaml.safe_dump(doc))
    return start_sidecar(cfg)


def _renew(sidecar) -> str:
    status, doc = admin_get(sidecar, "/rotate", method="POST", timeout=60)
    assert status == 200, doc
    return doc["serial"]


def test_renewal_and_bundle_polls_go_to_the_next_replica_when_one_dies(tmp_path):
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    a = start_ca(home)
    b = start_ca(home)
    procs = [a, b]
    try:
        web = _sidecar(tmp_path, a, [a.url, b.url])
        procs.append(web)
        first = admin_get(web, "/identity")[1]["serial"]
        a.proc.kill()  # SIGKILL: connections to it are refused from now on
        a.proc.wait(timeout=10)
        second = _renew(web)
        assert second != first
        serials = {c["serial"] for c in workload_certs(home)}
        assert {first, second} <= serials  # both in the (shared) ledger
        _, before = admin_get(web, "/status")
        polled = before["bundle"]["last_poll"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, st = admin_get(web, "/status")
            if st["bundle"]["last_poll"] != polled and st["bundle"]["last_error"] is None:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no bundle poll succeeded after replica A died: {st['bundle']}")
    finally:
        for p in reversed(procs):
            p.stop()


def test_a_replica_answering_429_is_passed_over(tmp_path):
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    limited = start_ca(home, "--rate", "0.001", "--burst", "1")  # one issuance per identity
    other = start_ca(home)
    procs = [limited, other]
    try:
        web = _sidecar(tmp_path, limited, [limited.url, other.url])
        procs.append(web)
        first = admin_get(web, "/identity")[1]["serial"]
        second = _renew(web)  # `limited` answers 429 rate_limited: `other` issues
        assert second != first
        assert len([c for c in workload_certs(home) if c["spiffe_id"] == WEB]) == 2
    finally:
        for p in reversed(procs):
            p.stop()


def _replicas_on_one_port(home, *first_args: str):
    """`meshca serve` on 127.0.0.2:P (with `first_args`) and on 127.0.0.3:P, the same P."""
    for _ in range(5):
        first = start_ca(home, "--listen", "127.0.0.2:0", *first_args)
        port = first.host_port[1]
        try:
            return first, start_ca(home, "--listen", f"127.0.0.3:{port}"), port
        except AssertionError:  # P is taken on 127.0.0.3: another P
            first.stop()
    raise AssertionError("no port free on both 127.0.0.2 and 127.0.0.3")


def test_the_replicas_behind_one_name_are_tried_address_by_address(tmp_path):
    """One name, two addresses (a fixed resolver stands in for DNS): the replica at the
    first answers 429, the one at the second issues; the handshake verified the name."""
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    limited, other, port = _replicas_on_one_port(home, "--rate", "0.001", "--burst", "1")
    try:

        async def resolve(host: str, port: int) -> list[str]:
            assert host == SERVICE
            return ["127.0.0.2", "127.0.0.3"]

        bundle = limited.bundle.read_text()
        client = EnrollmentClient(
            f"https://{SERVICE}:{port}", bundle, ca_id=CA_ID, resolver=resolve
        )
        key, csr = new_key_and_csr()
        first = asyncio.run(client.enroll(csr, mint_token(home, WEB)))  # 127.0.0.2 issues
        _, csr = new_key_and_csr()
        # 127.0.0.2 has spent its one issuance for WEB and answers 429: 127.0.0.3 issues
        second = asyncio.run(client.renew(csr, first.chain_pem, private_key_pem(key)))
        assert second.serial != first.serial
        assert {c["serial"] for c in workload_certs(home)} == {first.serial, second.serial}
        assert client.url == f"https://{SERVICE}:{port}"
        other.proc.kill()  # SIGKILL the replica that answered last: the poll goes round
        other.proc.wait(timeout=10)
        doc, _, _ = asyncio.run(
            fetch_bundle(
                f"https://{SERVICE}:{port}",
                bundle,
                dt.datetime.now(dt.UTC),
                ca_id=CA_ID,
                resolver=resolve,
            )
        )
        assert doc is not None and doc.trust_domain == "cluster.local" and doc.roots
    finally:
        other.stop()
        limited.stop()
