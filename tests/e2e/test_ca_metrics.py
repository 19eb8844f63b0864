"""`meshca serve --metrics-listen` serves Prometheus metrics that count exactly what happened.

A real CA with a metrics listener on a free loopback port; enrollments with good and
bad join tokens, a renewal over mTLS and a JWT-SVID with curl; then /metrics scraped
with urllib shows exact counts and the CA's state, negotiates OpenMetrics when asked,
and passes `promtool check metrics` (Prometheus' own linter) without a remark.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from helpers import curl, curl_enroll, mint_token, openssl_csr, run_meshca, start_ca
from prometheus_client.parser import text_string_to_metric_families

from meshca import pki

WEB = "spiffe://cluster.local/ns/default/sa/web-{}"


def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    """(Content-Type, body) of GET url/metrics."""
    req = urllib.request.Request(url + "/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(page: dict, name: str, **labels: str) -> float:
    return page[(name, tuple(sorted(labels.items())))]


@dataclass
class Scraped:
    home: Path
    bundle: Path
    chain: str  # of the first enrollment: leaf, intermediate
    content_type: str
    text: str
    om_content_type: str
    om_text: str


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> Scraped:
    """Runs the CA, enrolls, refuses, revokes, then scrapes (text and OpenMetrics)."""
    tmp_path = tmp_path_factory.mktemp("metrics")
    ca_home = tmp_path / "ca"
    run_meshca("init", "--home", str(ca_home))
    # Three failed authentications spend the source address' budget: the next request
    # from 127.0.0.1 is rate limited.
    ca = start_ca(
        ca_home,
        "--metrics-listen",
        "127.0.0.1:0",
        "--auth-fail-burst",
        "3",
        "--auth-fail-rate",
        "0.001",
    )
    try:
        found = [
            m.group(1)
            for line in ca.stdout_lines
            if (m := re.search(r"metrics listening on (http://\S+)", line))
        ]
        assert len(found) == 1, ca.stdout_lines
        url = found[0]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and url != ca.url

        # Three enrollments with join tokens.
        docs, tokens = [], []
        for i in range(3):
            key, csr = openssl_csr(tmp_path, f"web{i}")
            tokens.append(mint_token(ca.home, WEB.format(i)))
            status, doc = curl_enroll(ca, csr, tokens[-1])
            assert status == 200, doc
            docs.append((key, doc))
        key0, doc0 = docs[0]
        chain0 = tmp_path / "web0-chain.pem"
        chain0.write_text(doc0["certificate_chain"])

        # A renewal over mTLS (no token) and a JWT-SVID.
        _, csr = openssl_csr(tmp_path, "web0-renew")
        status, doc = curl_enroll(ca, csr, None, "--cert", str(chain0), "--key", str(key0))
        assert status == 200 and doc["spiffe_id"] == WEB.format(0), doc
        status, body, _ = curl(
            ca,
            "/v1/jwt",
            "--cert",
            str(chain0),
            "--key",
            str(key0),
            "-H",
            "Content-Type: application/json",
            "--data",
            '{"audience": "orders"}',
        )
        assert status == 200, body

        # Refusals: a bad CSR with a good token, two garbage tokens and a replayed one
        # (three 401s: the budget is spent), then a good token from the same address.
        bad = tmp_path / "bad.csr"
        bad.write_text("hello")
        status, doc = curl_enroll(ca, bad, mint_token(ca.home, WEB.format(9)))
        assert (status, doc["error"]) == (400, "bad_csr")
        for token in ("not-a-jwt", "still.not.one", tokens[1]):
            _, csr = openssl_csr(tmp_path, "refused")
            status, doc = curl_enroll(ca, csr, token)
            assert (status, doc["error"]) == (401, "invalid_token"), doc
        _, csr = openssl_csr(tmp_path, "limited")
        status, doc = curl_enroll(ca, csr, mint_token(ca.home, WEB.format(8)))
        assert (status, doc["error"]) == (429, "rate_limited"), doc

        # Revoked while the CA runs: the scrape reads the ledger as it is now.
        run_meshca("revoke", "--home", str(ca.home), "--serial", docs[2][1]["serial"])

        content_type, text = scrape(url)
        om_type, om_text = scrape(url, "application/openmetrics-text; version=1.0.0")
    finally:
        ca.stop()
    return Scraped(
        ca.home, ca.bundle, doc0["certificate_chain"], content_type, text, om_type, om_text
    )


def test_scrape_negotiates_the_format(scraped):
    content_type, text = scraped.content_type, scraped.text
    om_type, om_text = scraped.om_content_type, scraped.om_text
    assert content_type.startswith("text/plain; version=0.0.4")
    assert om_type.startswith("application/openmetrics-text; version=1.0.0")
    assert om_text.endswith("# EOF\n") and "# EOF" not in text


def test_counts_are_exact(scraped):
    page = samples(scraped.text)
    assert value(page, "meshca_ca_issuances_total", credential="join_token") == 3
    assert value(page, "meshca_ca_issuances_total", credential="mtls_renewal") == 1
    assert value(page, "meshca_ca_issuances_total", credential="k8s_token") == 0
    refusals = {
        dict(labels)["reason"]: v
        for (name, labels), v in page.items()
        if name == "meshca_ca_refusals_total" and v
    }
    assert refusals == {"bad_csr": 1, "invalid_token": 3, "rate_limited": 1}
    assert value(page, "meshca_ca_rate_limited_total") == 1
    assert value(page, "meshca_ca_jwt_svids_total") == 1
    hist = "meshca_ca_enrollment_duration_seconds"
    assert value(page, hist + "_count", outcome="issued") == 4
    assert value(page, hist + "_count", outcome="refused") == 5
    assert value(page, hist + "_bucket", outcome="issued", le="10.0") == 4


def test_gauges_show_the_state(scraped):
    """What the chain, the bundle, state.json and the ledger say."""
    page = samples(scraped.text)
    inter = x509.load_pem_x509_certificates(scraped.chain.encode())[1]
    assert value(page, "meshca_ca_intermediate_not_after_seconds") == (
        inter.not_valid_after_utc.timestamp()
    )
    [root] = x509.load_pem_x509_certificates(scraped.bundle.read_bytes())
    cn = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    roots = {dict(labels)["root"]: v for (n, labels), v in page.items() if "root_not_after" in n}
    assert roots == {cn: root.not_valid_after_utc.timestamp()}
    assert pki.serial_hex(root) not in roots
    assert value(page, "meshca_ca_root_rotation_stage", stage="none") == 1
    assert value(page, "meshca_ca_root_rotation_stage", stage="prepared") == 0
    state = json.loads((scraped.home / "state.json").read_text())
    assert value(page, "meshca_ca_bundle_sequence") == state["sequence"]
    assert value(page, "meshca_ca_revoked_serials") == 1
    # 4 workload certificates and the CA's own serving certificate.
    assert value(page, "meshca_ca_ledger_certificates") == 5


def test_promtool_finds_nothing_to_say(scraped):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package prometheus; `make deps` installs it)")
    lint = subprocess.run(
        [promtool, "check", "metrics"],
        input=scraped.text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), lint
