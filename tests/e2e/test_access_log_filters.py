"""The access log's filters, as an operator sets them: `access_log.mode: errors` writes only
the exchanges that failed (status >= 400, or an answer the sidecar gave itself), `off`
writes none, `sample: 0` keeps the errors and drops the rest. What is filtered out is
still served and still counted: the filter is the log's, not the request's."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from conftest import BACKEND, FRONTEND
from helpers import run_meshca, start_ca
from mesh import admin_get, hostport, proxy_get, sidecar_config, start_echo, start_sidecar


def _with_access_log(config, access_log: dict):
    doc = yaml.safe_load(config.read_text())
    doc["access_log"] = access_log
    config.write_text(yaml.safe_dump(doc))
    return config


def _lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """CA; the echo app behind a sidecar that logs errors only; two frontends, one with
    the log off and one sampling none of the successes."""
    root = tmp_path_factory.mktemp("accesslog")
    home = root / "ca"
    run_meshca("init", "--home", str(home))
    procs = []
    try:
        ca = start_ca(home)
        procs.append(ca)
        app = start_echo()
        procs.append(app)
        backend = start_sidecar(
            _with_access_log(
                sidecar_config(root, "backend", ca, BACKEND, app=hostport(app.urls["echo"])),
                {"mode": "errors"},
            )
        )
        procs.append(backend)
        services = {
            "backend.default": {
                "endpoints": [hostport(backend.urls["inbound"])],
                "identity": BACKEND,
            },
            # the right address, the wrong identity: the sidecar answers 502 itself
            "impostor.default": {
                "endpoints": [hostport(backend.urls["inbound"])],
                "identity": "spiffe://cluster.local/ns/default/sa/other",
            },
        }
        off = start_sidecar(
            _with_access_log(
                sidecar_config(root, "off", ca, FRONTEND, services=services), {"mode": "off"}
            )
        )
        procs.append(off)
        sampled = start_sidecar(
            _with_access_log(
                sidecar_config(root, "sampled", ca, FRONTEND, services=services), {"sample": 0}
            )
        )
        procs.append(sampled)
        yield {"backend": backend, "off": off, "sampled": sampled}
    finally:
        for p in reversed(procs):
            p.stop()


def _calls(frontend) -> None:
    for url, want in (
        ("http://backend.default/fine", 200),
        ("http://backend.default/missing?status=404", 404),
        ("http://backend.default/broken?status=503", 503),
        ("http://impostor.default/who", 502),
    ):
        status, body, _ = proxy_get(frontend, url)
        assert status == want, (url, status, body)


def test_errors_only_and_sampling_keep_the_errors(rig):
    _calls(rig["sampled"])
    _calls(rig["off"])
    time.sleep(1.5)  # the log is flushed at least every second
    got = {(r["path"], r["status"]) for r in _lines(rig["sampled"])}
    assert got == {("/missing", 404), ("/broken", 503), ("/who", 502)}, rig["sampled"].stdout
    # the inbound side logs errors only: the app's 404 and 503, twice each (two frontends)
    inbound = [(r["path"], r["status"]) for r in _lines(rig["backend"])]
    assert sorted(inbound) == [("/broken", 503)] * 2 + [("/missing", 404)] * 2, inbound


def test_off_writes_no_line_and_still_serves(rig):
    status, body, _ = proxy_get(rig["off"], "http://backend.default/after")
    assert status == 200 and json.loads(body)["path"] == "/after"
    time.sleep(1.5)
    assert _lines(rig["off"]) == [], rig["off"].stdout
    # ... and the sidecar's own figures still count what was not logged
    status, stats = admin_get(rig["off"], "/stats")
    assert status == 200 and "backend.default" in json.dumps(stats), stats
