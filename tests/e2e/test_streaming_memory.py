"""A 512 MiB upload and a 256 MiB download stream through both sidecars without being held
in memory: each sidecar's peak resident memory stays far below the body size."""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path

from mesh import hostport


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_bodies_stream(mesh):
    chunk = bytes(range(256)) * 4096  # 1 MiB
    total = 512
    digest = hashlib.sha256()
    for _ in range(total):
        digest.update(chunk)

    def body():
        for _ in range(total):
            yield chunk

    host, port = hostport(mesh.frontend.urls["outbound"]).split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request(
        "POST",
        "http://backend.default/upload",
        body=body(),
        encode_chunked=True,
        headers={"Transfer-Encoding": "chunked"},
    )
    resp = conn.getresponse()
    seen = json.loads(resp.read())
    conn.close()
    assert resp.status == 200
    assert seen["body_bytes"] == total << 20
    assert seen["body_sha256"] == digest.hexdigest()
    # and 256 MiB the other way
    size = 256 << 20
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("GET", f"http://backend.default/download?download={size}")
    resp = conn.getresponse()
    got, h = 0, hashlib.sha256()
    while block := resp.read(1 << 20):
        got += len(block)
        h.update(block)
    conn.close()
    expected = hashlib.sha256()
    block = bytes(range(256)) * 256
    for _ in range(size // len(block)):
        expected.update(block)
    assert resp.status == 200 and got == size and h.hexdigest() == expected.hexdigest()
    for proc in (mesh.backend, mesh.frontend):
        assert peak_rss_mib(proc.proc.pid) < 160, "the body must not be buffered"
