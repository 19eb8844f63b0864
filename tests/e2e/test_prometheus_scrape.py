"""A real Prometheus server (Debian's `prometheus`, started here on loopback) scrapes two
sidecars and the CA; after traffic, PromQL through its HTTP API returns the request count
by source and destination principal and response code, the certificate-expiry gauge, and
the CA's issuance count: what an SRE's dashboard would show."""

from __future__ import annotations

import calendar
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import BACKEND
from helpers import Lines, free_port, gave_up, start_ca, stop_process, tail
from mesh import admin_get, hostport, proxy_get, sidecar_config, start_echo, start_sidecar

pytestmark = pytest.mark.e2e
FRONT = "spiffe://cluster.local/ns/shop/sa/web"


def with_metrics(cfg: Path) -> Path:
    doc = yaml.safe_load(cfg.read_text())
    doc["metrics"] = {"listen": "127.0.0.1:0"}
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


class Prometheus:
    def __init__(self, binary: str, folder: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        scrape = [
            {
                "job_name": job,
                "scrape_interval": "1s",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
            for job, target in targets.items()
        ]
        (folder / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": scrape}))
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        self.log = Lines(self.proc.stderr)
        if not self.log.follow(lambda line: "Server is ready to receive web requests" in line, 30):
            raise AssertionError(gave_up("prometheus", self.proc, 30, {"stderr": self.log}))

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def value_until(self, promql: str, want, timeout: float = 30) -> float:
        """Query until the single result equals `want` (the scrapes are 1 s apart)."""
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            result = self.query(promql)
            got = float(result[0]["value"][1]) if len(result) == 1 else None
            if got is not None and (want is None or got == want):
                return got
            time.sleep(0.5)
        raise AssertionError(f"{promql}: {got!r}, not {want!r}\n{tail(self.log.lines)}")

    def stop(self) -> None:
        stop_process(self.proc)


def test_prometheus_scrapes_two_sidecars_and_the_ca(ca_home, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus is not installed (Debian package prometheus; make test installs it)"
        )
    procs: list = []
    try:
        metrics_port = free_port()
        ca = start_ca(ca_home, "--metrics-listen", f"127.0.0.1:{metrics_port}")
        procs.append(ca)
        echo = start_echo()
        procs.append(echo)
        backend = start_sidecar(
            with_metrics(
                sidecar_config(tmp_path, "backend", ca, BACKEND, app=hostport(echo.urls["echo"]))
            )
        )
        procs.append(backend)
        services = {
            "backend.default": {
                "identity": BACKEND,
                "endpoints": [hostport(backend.urls["inbound"])],
            }
        }
        frontend = start_sidecar(
            with_metrics(sidecar_config(tmp_path, "frontend", ca, FRONT, services=services))
        )
        procs.append(frontend)
        prom = Prometheus(
            binary,
            tmp_path,
            {
                "backend": hostport(backend.urls["metrics"]),
                "frontend": hostport(frontend.urls["metrics"]),
                "meshca": f"127.0.0.1:{metrics_port}",
            },
        )
        procs.append(prom)

        statuses = [proxy_get(frontend, f"http://backend.default/{n}")[0] for n in range(25)]
        assert statuses == [200] * 25
        by_pair = (
            f'sum(istio_requests_total{{reporter="destination",source_principal="{FRONT}",'
            f'destination_principal="{BACKEND}",response_code="200"}})'
        )
        assert prom.value_until(by_pair, 25) == 25
        from_source = (
            'sum(istio_requests_total{reporter="source",source_workload="web",'
            'destination_workload="backend",response_code="200"})'
        )
        assert prom.value_until(from_source, 25) == 25

        _, ident = admin_get(frontend, "/identity")
        want = calendar.timegm(time.strptime(ident["not_after"], "%Y-%m-%dT%H:%M:%SZ"))
        got = prom.value_until('meshca_sidecar_certificate_not_after_seconds{job="frontend"}', None)
        assert abs(got - want) <= 1
        # the CA issued two certificates (one per sidecar, each with a join token)
        assert prom.value_until('sum(meshca_ca_issuances_total{job="meshca"})', 2) == 2
    finally:
        for p in reversed(procs):
            p.stop()
