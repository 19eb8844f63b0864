"""When the heap keeper trims: after new connections, once they stop for a tick, or every
BUSY_INTERVAL seconds while they go on; never when nothing happened. At start it gives
back the file pages start-up left resident, and only clean ones."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from sidecar.heap import BUSY_INTERVAL, TICK, HeapKeeper, clean_file_ranges


def run(accepted_per_tick: list[int]) -> list[int]:
    """Ticks with that many new connections before each; the ticks at which it trimmed."""
    now = [0.0]
    trims: list[int] = []
    keeper = HeapKeeper(clock=lambda: now[0], trim=lambda pad: trims.append(pad) or 1)
    made = keeper.counting(lambda: object())
    trimmed = []
    for i, n in enumerate(accepted_per_tick):
        for _ in range(n):
            made()
        now[0] += TICK
        if keeper.due(now[0]):
            keeper.trim()
            trimmed.append(i)
    assert trims == [0] * len(trimmed)  # malloc_trim(0): keep no padding
    return trimmed


BUSY = int(BUSY_INTERVAL / TICK)


@pytest.mark.parametrize(
    ("ticks", "trimmed"),
    [
        ([0, 0, 0, 0], []),  # idle from the start: nothing to give back
        ([5, 0, 0, 0], [1]),  # a burst, then quiet: one trim, a tick after the last one
        ([5, 0, 5, 0, 0], [1, 3]),  # each burst once
        ([5] * (2 * BUSY + 1) + [0], [BUSY - 1, 2 * BUSY - 1, 2 * BUSY + 1]),  # sustained
    ],
)
def test_trims_after_connections_stop_or_every_busy_interval(ticks, trimmed):
    assert run(ticks) == trimmed


def test_counting_passes_the_factorys_protocol_through():
    keeper = HeapKeeper(trim=lambda pad: 0)
    made = keeper.counting(lambda: "protocol")
    assert [made(), made()] == ["protocol", "protocol"]
    assert keeper.accepted == 2


def block(
    head: str, rss: int, anon: int, swap: int | None = 0, flags: str = "rd mr mw me"
) -> bytes:
    """One mapping of /proc/<pid>/smaps, as the kernel writes it (fields abridged)."""
    lines = [head, "Size:               4096 kB", f"Rss:             {rss:6d} kB"]
    lines += ["Pss:                  4 kB", f"Anonymous:       {anon:6d} kB"]
    if swap is not None:
        lines.append(f"Swap:            {swap:6d} kB")
    lines += ["SwapPss:               0 kB", "Locked:                0 kB", f"VmFlags: {flags}"]
    return ("\n".join(lines) + "\n").encode()


LIB = "fd:01 4242                 /usr/lib/libpython3.11.so.1.0"
SMAPS = b"".join(
    [
        # selected: code of a file, resident, untouched by writes
        block(f"55d0a0000000-55d0a0200000 r-xp 00001000 {LIB}", 1500, 0, flags="rd ex mr mw me"),
        # its relocated data: copied on write, in memory
        block(f"55d0a0200000-55d0a0300000 r--p 00201000 {LIB}", 300, 84),
        # the same, with the written pages swapped out (Anonymous 0, Swap 84)
        block(f"55d0a0300000-55d0a0400000 r--p 00301000 {LIB}", 12, 0, swap=84),
        # writable data
        block(f"55d0a0400000-55d0a0410000 rw-p 00401000 {LIB}", 64, 0, flags="rd wr mr mw me ac"),
        # selected: read-only data of a file whose name is not UTF-8 and has a space
        block(
            "55d0a0500000-55d0a0600000 r--p 00000000 fd:01 777   /data/cafe x.bin", 200, 0
        ).replace(b"cafe", b"caf\xe9"),
        # nothing resident
        block("55d0a0600000-55d0a0700000 r-xp 00000000 fd:01 778   /opt/never-run.so", 0, 0),
        # locked
        block(
            "55d0a0700000-55d0a0800000 r-xp 00000000 fd:01 779   /opt/locked.so",
            64,
            0,
            flags="rd ex mr mw me lo",
        ),
        # no Swap line: not known to be clean
        block(
            "55d0a0800000-55d0a0900000 r--p 00000000 fd:01 780   /opt/old-kernel", 64, 0, swap=None
        ),
        # anonymous memory: the heap, and a read-only anonymous mapping with nothing written
        block("55d0a1000000-55d0a2000000 rw-p 00000000 00:00 0      [heap]", 8000, 8000),
        block("7f0000000000-7f0000100000 r--p 00000000 00:00 0 ", 1024, 0),
    ]
)


@pytest.mark.parametrize("flag", ["lo", "ht", "io", "pf", "dd", None])
def test_locked_huge_io_pfn_or_unflagged_mappings_are_left(flag):
    head = "55d0a0000000-55d0a0200000 r-xp 00001000 fd:01 4242   /usr/lib/x.so"
    if flag is None:  # a block without its VmFlags line
        smaps = b"\n".join(
            line for line in block(head, 64, 0).split(b"\n") if b"VmFlags" not in line
        )
    else:
        smaps = block(head, 64, 0, flags=f"rd ex mr mw me {flag}")
    assert clean_file_ranges(smaps) == []
    assert clean_file_ranges(block(head, 64, 0, flags="rd ex mr mw me")) == [
        (0x55D0A0000000, 0x200000)
    ]


def test_only_clean_read_only_file_pages_are_released():
    """Code and read-only data of files, untouched by writes, with something resident: the
    libpython text and the data file. Not its relocated (copied-on-write) data, in memory
    or swapped out; not writable data, anonymous memory, a mapping with nothing resident,
    a locked one, or one whose block does not say how much of it is swapped."""
    assert clean_file_ranges(SMAPS) == [
        (0x55D0A0000000, 0x200000),
        (0x55D0A0500000, 0x100000),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_the_real_smaps_of_this_process_parses():
    with open("/proc/self/smaps", "rb") as f:
        ranges = clean_file_ranges(f.read())
    assert ranges  # this interpreter's own code, at least
    assert all(length > 0 and length % 4096 == 0 for _, length in ranges)


RELEASE = """
import json, ssl
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
import sidecar.cli  # what a sidecar maps at start-up
from sidecar.heap import release_file_pages

def file_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])

key = ec.generate_private_key(ec.SECP256R1())
before = file_kib()
released = release_file_pages()
after = file_kib()
# the code dropped runs again, from the files, through the relocated tables kept
sig = key.sign(b"data", ec.ECDSA(hashes.SHA256()))
key.public_key().verify(sig, b"data", ec.ECDSA(hashes.SHA256()))
ssl.create_default_context()
print(json.dumps({"before": before, "after": after, "released": released,
                  "again": file_kib()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_start_up_file_pages_go_back_and_the_code_still_runs():
    out = subprocess.run(
        [sys.executable, "-c", RELEASE], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    # measured: 16.6 -> 3.0 MiB of file pages resident after importing the sidecar
    assert got["after"] < got["before"] / 2, got
    assert got["released"] >= got["before"] - got["after"] - 256, got
    assert got["again"] > got["after"]  # what ran since came back from the files


def test_the_keeper_releases_file_pages_when_settled_not_at_start(monkeypatch):
    import sidecar.heap as heap

    calls = []
    trims = []
    monkeypatch.setattr(heap, "release_file_pages", lambda: calls.append(1) or 0)
    monkeypatch.setattr(heap.gc, "freeze", lambda: None)  # not this test process's objects

    async def run(keeper: HeapKeeper) -> None:
        before = len(calls)
        keeper.start()  # before enrollment: releasing now would be undone by it
        assert len(calls) == before
        keeper.settle()  # a certificate was obtained
        keeper.settle()  # and renewed
        keeper.stop()

    releasing = HeapKeeper(trim=lambda pad: trims.append(pad) or 0)
    asyncio.run(run(releasing))
    assert calls == [1, 1]
    assert releasing.releases == 2
    assert trims == [0, 0, 0]  # start, then each settle, hands free heap back too
    asyncio.run(run(HeapKeeper(trim=lambda pad: 0, release_files=False)))
    assert calls == [1, 1]


def test_a_failed_release_never_stops_the_keeper(monkeypatch, caplog):
    import sidecar.heap as heap

    def broken() -> int:
        raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")

    monkeypatch.setattr(heap, "release_file_pages", broken)
    monkeypatch.setattr(heap.gc, "freeze", lambda: None)

    async def run() -> bool:
        keeper = HeapKeeper(trim=lambda pad: 0)
        keeper.start()
        keeper.settle()
        ticking = keeper._handle is not None
        keeper.stop()
        return ticking

    assert asyncio.run(run()) is True
    assert "releasing file pages failed" in caplog.text
