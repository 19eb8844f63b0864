"""A sidecar whose `ca.url` lists several CA replicas fails over between them: a replica
that cannot be reached (SIGKILLed) or answers 429/5xx is passed over for the next, for
renewals and for the trust-bundle poll. The replicas here are `meshca serve` processes on
one state directory (the SQLite ledger is shared on one machine; across machines that is
what the PostgreSQL store is for)."""

from __future__ import annotations

import time

import yaml
from helpers import run_meshca, start_ca, workload_certs
from mesh import admin_get, sidecar_config, start_sidecar

WEB = "spiffe://cluster.local/ns/default/sa/web"


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
