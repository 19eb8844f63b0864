"""One join token sent by many clients at once yields exactly one certificate."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

from helpers import mint_token, openssl_csr, request_json, workload_certs

WEB = "spiffe://cluster.local/ns/default/sa/web"


def test_concurrent_replays_get_one_certificate(tmp_path, ca):
    token = mint_token(ca.home, WEB)
    bodies = []
    for i in range(12):
        _, csr = openssl_csr(tmp_path, f"c{i}")
        body = tmp_path / f"c{i}.json"
        body.write_text(request_json(csr.read_text()))
        bodies.append(body)

    def post(body):
        return subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                str(ca.bundle),
                "-H",
                f"Authorization: Bearer {token}",
                "--data-binary",
                f"@{body}",
                ca.url + "/v1/certificates",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    with ThreadPoolExecutor(max_workers=12) as pool:
        codes = sorted(pool.map(post, bodies))
    assert codes == ["200"] + ["401"] * 11
    assert len(workload_certs(ca.home)) == 1
    assert token not in ca.log
    for key in ca.home.glob("*.key"):
        body = "".join(key.read_text().splitlines()[1:-1])
        assert body[:40] not in ca.log, "no key material in the log"
