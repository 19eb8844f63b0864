"""Enrollment and renewal do not leave cryptography's code resident in the sidecar.

Enrolling runs a lot of `cryptography` (a key, a CSR, parsing and validating the chain)
once the listeners are up; its Rust library's code is about 8 MiB, and that work maps
most of it into the sidecar's VmRSS, where the data path never uses it again. The
sidecar drops those clean file pages after each certificate it obtains
(`HeapKeeper.settle`), and what it does per request and per probe (readiness,
`/status`, a metrics scrape) reads what it needs from plain values kept at build
time, not from the certificate objects. So what stays is the library's relocated data
and the code the data path runs (parsing a new peer's certificate).

Measured here (the library's resident code, KiB; its relocated data is 684 more): with
no release after enrollment, 7,728 after enrollment, five requests and the probes; now
2,224 (a new peer's certificate parsed, the probes), and 1,212 after a renewal.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from helpers import tail
from mesh import admin_get, hostport
from tlsclient import client_context, connect, get, read_response, start_backend

RUST_LIB = re.compile(r"/cryptography/hazmat/bindings/_rust[^/]*\.so$")
# What the data path runs (a new peer's certificate parsed once) maps back about 2 MiB
# of the library's code; enrollment left 7.5 MiB before.
CODE_BOUND_KIB = 3 * 1024


def library_code_kib(pid: int) -> tuple[int, int]:
    """(file-backed KiB, copied-on-write KiB) resident of cryptography's Rust library."""
    text = Path(f"/proc/{pid}/smaps").read_text()
    clean = written = 0
    ours = False
    for line in text.splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            ours = len(head) >= 6 and bool(RUST_LIB.search(head[-1]))
        elif ours and line.startswith("Rss:"):
            clean += int(head[1])
        elif ours and line.startswith("Anonymous:"):
            written += int(head[1])
    assert clean > 0, "cryptography's Rust library is not mapped in the sidecar"
    return clean - written, written


def traffic(ctx, where: str, n: int = 5) -> None:
    for i in range(n):
        s = connect(ctx, where)
        try:
            s.sendall(get(f"/settled/{i}"))
            head, body = read_response(s)
        finally:
            s.close()
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert json.loads(body)["path"] == f"/settled/{i}"


def probes(sidecar) -> None:
    assert admin_get(sidecar, "/ready")[0] == 200
    status, doc = admin_get(sidecar, "/status")
    assert status == 200 and doc["bundle"]["roots"], doc


def test_enrollment_and_renewal_leave_no_cryptography_code_resident(ca, tmp_path):
    ctx = client_context(ca, tmp_path)
    app, sidecar = start_backend(tmp_path, ca, drain=1)
    try:
        pid = sidecar.proc.pid
        where = hostport(sidecar.urls["inbound"])
        traffic(ctx, where)
        probes(sidecar)
        time.sleep(0.5)
        code, relocated = library_code_kib(pid)
        figures = f"after enrollment: {code} KiB of code, {relocated} KiB relocated"
        print(figures)
        assert code <= CODE_BOUND_KIB, f"{figures}\n{tail(sidecar.err)}"

        status, doc = admin_get(sidecar, "/rotate", method="POST")
        assert status == 200, doc
        traffic(ctx, where)
        probes(sidecar)
        time.sleep(0.5)
        code, relocated = library_code_kib(pid)
        figures += f"; after a renewal: {code} KiB of code, {relocated} KiB relocated"
        print(figures)
        assert code <= CODE_BOUND_KIB, f"{figures}\n{tail(sidecar.err)}"
    finally:
        sidecar.stop()
        app.stop()
