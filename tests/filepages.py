"""What a sidecar process holds of cryptography's Rust library, and how often it has
released its file pages (its DEBUG log): for the tests of `HeapKeeper.settle`."""

from __future__ import annotations

import re
from pathlib import Path

RUST_LIB = re.compile(r"/cryptography/hazmat/bindings/_rust[^/]*\.so$")


def library_kib(pid: int) -> tuple[int, int, int]:
    """Of cryptography's Rust library in process `pid`: (file-backed KiB resident,
    copied-on-write KiB resident, KiB mapped from the file read-only: its code and
    read-only data)."""
    text = Path(f"/proc/{pid}/smaps").read_text()
    clean = written = mapped = 0
    ours = False
    for line in text.splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            ours = len(head) >= 6 and bool(RUST_LIB.search(head[-1]))
            read_only = len(head) >= 2 and "w" not in head[1]
        elif ours and line.startswith("Size:") and read_only:
            mapped += int(head[1])
        elif ours and line.startswith("Rss:"):
            clean += int(head[1])
        elif ours and line.startswith("Anonymous:"):
            written += int(head[1])
    assert clean > 0, "cryptography's Rust library is not mapped in the sidecar"
    return clean - written, written, mapped


def settles(sidecar) -> str:
    """The sidecar's log lines about what it obtained, polled and released."""
    lines = [
        line
        for line in sidecar.stderr.splitlines()
        if any(w in line for w in ("settled", "certificate", "bundle", "WARNING", "ERROR"))
    ]
    return "\n".join(lines[-40:])


def releases(sidecar) -> int:
    """How many times the sidecar has released its file pages (its DEBUG log says); or
    in a part of that log, given as text."""
    text = sidecar if isinstance(sidecar, str) else sidecar.stderr
    return text.count("sidecar.heap: settled:")
