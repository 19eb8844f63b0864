"""A slow app: the requests it sits on get 504, the others are served meanwhile.

backend's sidecar gives the app 2 s (`inbound.app_timeout`). Several requests the
app answers only after 5 s are in flight at once; while they wait, other calls
through the same two sidecars, on other connections, are answered 200. Each slow
request then gets 504 with the JSON error `upstream_timeout`, and the sidecars go
on serving.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from conftest import BACKEND, FRONTEND
from helpers import run_meshca, start_ca
from mesh import hostport, proxy_get, sidecar_config, start_echo, start_sidecar

SLOW = 4


@pytest.fixture
def frontend(tmp_path: Path):
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    procs: list = []
    try:
        ca = start_ca(home)
        procs.append(ca)
        app = start_echo()
        procs.append(app)
        backend = start_sidecar(
            sidecar_config(
                tmp_path,
                "backend",
                ca,
                BACKEND,
                app=hostport(app.urls["echo"]),
                inbound_extra={"app_timeout": 2.0},
            )
        )
        procs.append(backend)
        front = start_sidecar(
            sidecar_config(
                tmp_path,
                "frontend",
                ca,
                FRONTEND,
                services={
                    "backend.default": {
                        "endpoints": [hostport(backend.urls["inbound"])],
                        "identity": BACKEND,
                    }
                },
            )
        )
        procs.append(front)
        yield front
    finally:
        for p in reversed(procs):
            p.stop()


def test_slow_requests_time_out_while_others_are_served(frontend):
    slow: list[tuple[int, bytes]] = []

    def one_slow(i: int) -> None:
        status, body, _ = proxy_get(frontend, f"http://backend.default/slow/{i}?delay=5")
        slow.append((status, body))

    threads = [threading.Thread(target=one_slow, args=(i,)) for i in range(SLOW)]
    for t in threads:
        t.start()
    fast = []
    while any(t.is_alive() for t in threads):
        fast.append(proxy_get(frontend, f"http://backend.default/fast/{len(fast)}")[0])
    for t in threads:
        t.join(30)
    assert fast and set(fast) == {200}, fast
    assert len(slow) == SLOW
    for status, body in slow:
        assert status == 504 and json.loads(body)["error"] == "upstream_timeout", (status, body)
    assert proxy_get(frontend, "http://backend.default/after")[0] == 200
