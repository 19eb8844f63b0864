"""Give memory freed by closed connections back to the system, so that the sidecar's resident
size comes back to its idle level after connection churn.

Why it exists (tests/e2e/test_memory_churn.py; figures in docs/sidecar.md, "Memory"):
as shipped, 20,000 mTLS connections (one request each, 32 at a time) took the
sidecar from 57 MiB to 90 MiB and more, and it stayed there once idle. Two causes:

- Closed connections are freed late. A closed HTTP/1.1 connection is a reference
  cycle (the connection and its httptools parser's bound callbacks), so its TLS
  transport (uvloop's 256 KiB read buffer, OpenSSL's SSL object and buffers) waits
  for a full collection of the cyclic garbage collector, which the interpreter runs
  only after thousands of connections' worth of objects, each run walking every
  object of the process (about 60 ms for the ~50,000 made at start-up).
- Freed memory is kept. Those buffers and OpenSSL's per-connection allocations are
  freed out of order, so glibc's heap is left fragmented below its top and is never
  trimmed; `malloc_trim(0)` gives the free pages inside it back (it returned 29 of
  33 MiB).

So: once set up, the objects made at start-up are frozen out of the collector's
walks (`gc.freeze()`: a full collection then costs well under a millisecond);
every accepted connection bumps a counter (`counting`, one call per connection, no
cost per request); a timer looks at the counter once a second, and after some churn,
when the listeners have been quiet for a second, or at most every `BUSY_INTERVAL`
seconds under sustained churn, collects the cyclic garbage and trims the heap.
Where glibc is absent (musl, macOS) only the collection runs.

Start-up also leaves code resident that the sidecar does not run again: the pages of
the interpreter, `cryptography`'s own OpenSSL and the extension modules that imports,
configuration and enrollment touched (about 17 MiB of mapped code and read-only data
here, of a 45 MiB process; enrollment alone, run once the listeners are up, brings back
5 MiB of `cryptography`'s Rust code: key generation, the CSR, parsing and validating the
chain). Those pages are clean copies of files, which the kernel may drop at any time and
map back on the next use; `release_file_pages` drops them from the process each time
such work is done (`settle`: after each certificate obtained, at start-up and at each
renewal, and after each bundle document fetched), so that only what the data path
runs comes back into its VmRSS (figures in docs/sidecar.md, "Memory"). They stay in
the page cache, shared with other processes mapping the same files. It leaves alone
every page a write has touched: writable mappings, and read-only ones with any
copied-on-write page (relocated data), in memory or swapped out, whose contents the
file does not hold.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("sidecar.heap")

TICK = 1.0  # seconds between two looks at the connection counter
BUSY_INTERVAL = 3.0  # seconds: under sustained churn, trim at most this often
T = TypeVar("T")
MADV_DONTNEED = 4  # Linux: drop the range's pages; a file's clean pages are read back on use
# A mapping's first line in /proc/<pid>/smaps: start-end perms offset dev inode [path]
_MAPPING = re.compile(rb"([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)")
_MAPPING_START = re.compile(rb"\n(?=[0-9a-f]+-[0-9a-f]+ )")
# VmFlags of mappings never dropped: locked, huge pages, I/O or PFN memory, no dump
_NOT_PLAIN = frozenset((b"lo", b"ht", b"io", b"pf", b"dd"))


def _glibc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and macOS lack it)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def clean_file_ranges(smaps: bytes) -> list[tuple[int, int]]:
    """The (start, length) of every mapping in `smaps` (the bytes of /proc/<pid>/smaps)
    whose resident pages are all clean copies of a file: backed by a file (an inode), not
    writable, with some page resident, and none copied on write, whether in memory
    (`Anonymous:`) or swapped out (`Swap:`); neither locked, huge-page, nor I/O or PFN
    memory (`VmFlags`). A mapping whose block lacks one of those lines is left alone."""
    ranges: list[tuple[int, int]] = []
    for block in _MAPPING_START.split(b"\n" + smaps)[1:]:
        m = _MAPPING.match(block)
        if m is None:
            continue
        start, end, perms, inode = m.groups()
        if inode == b"0" or perms[1:2] == b"w":
            continue
        fields = {}
        for line in block.split(b"\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name] = value.split()
        try:
            resident = int(fields[b"Rss"][0])
            written = int(fields[b"Anonymous"][0]) + int(fields[b"Swap"][0])
            flags = set(fields[b"VmFlags"])
        except (KeyError, IndexError, ValueError):
            continue
        if resident > 0 and written == 0 and not flags & _NOT_PLAIN:
            ranges.append((int(start, 16), int(end, 16) - int(start, 16)))
    return ranges


def release_file_pages() -> int:
    """Drop this process's resident pages that are clean copies of files (code and
    read-only data of the interpreter, libraries, extension modules); the KiB of VmRSS
    that went, or 0 where that cannot be done (not Linux, no /proc).

    The pages stay in the page cache: VmRSS goes down, the machine's free memory does
    not go up. The kernel maps a dropped page back from the file on the next use, as it
    does for the pages it reclaims itself under memory pressure. Ranges with a page a
    write touched are never dropped. Call it when no other thread maps or unmaps files
    (start-up, from the event loop): a range unmapped and mapped again as something
    else between the read of smaps and the madvise would lose what it holds. Nothing in
    the sidecar unmaps a library once loaded (Python never unloads an extension module;
    glibc keeps the NSS modules getaddrinfo loads).
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/proc/self/smaps", "rb") as f:  # paths are bytes, not always UTF-8
            smaps = f.read()
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    before = _file_rss_kib()
    for start, length in clean_file_ranges(smaps):
        madvise(start, length, MADV_DONTNEED)  # an error (EINVAL, EAGAIN): left as it is
    return max(before - _file_rss_kib(), 0)


def _file_rss_kib() -> int:
    """RssFile of this process, KiB (0 when /proc does not say)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class HeapKeeper:
    """Counts accepted connections; when they stop (or every few seconds while they go on),
    frees the cyclic garbage they left and hands free heap pages back to the system."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        trim: Callable[[int], int] | None = None,
        release_files: bool = True,
    ) -> None:
        self.accepted = 0  # connections accepted by the listeners that count
        self.trims = 0
        self.clock = clock
        self._trim = trim
        self.release_files = release_files  # drop file pages in settle()
        self.releases = 0  # file-page releases done
        self._seen = 0  # the counter at the previous tick
        self._done = 0  # the counter at the last trim
        self._last = clock()
        self._handle: asyncio.TimerHandle | None = None

    def counting(self, factory: Callable[[], T]) -> Callable[[], T]:
        """`factory` (a listener's protocol factory), counting each connection it is called for."""

        def made() -> T:
            self.accepted += 1
            return factory()

        return made

    def start(self) -> None:
        """Freeze what start-up made, give back the heap it no longer needs, and look at
        the counter every TICK seconds from now."""
        if self._trim is None:
            self._trim = _glibc_trim()
        gc.collect()
        gc.freeze()  # start-up objects live as long as the process: no collection walks them
        if self._trim is not None:
            self._trim(0)  # what start-up freed (config parsing, the bundle) goes back now
        self._last = self.clock()
        self._handle = asyncio.get_running_loop().call_later(TICK, self._tick)

    def settle(self) -> None:
        """Work the data path does not do is over (a certificate obtained, a bundle
        document fetched): give back the heap it freed and, unless told not to, the file
        pages it touched (`release_file_pages`). Never raises: memory it could not give
        back never stops the sidecar."""
        try:
            if self._trim is not None:
                self._trim(0)
            if self.release_files:
                released = release_file_pages()
                self.releases += 1
                log.debug("settled: %.1f MiB of file pages out of VmRSS", released / 1024)
        except Exception:
            log.exception("releasing file pages failed")

    def stop(self) -> None:
        """No more ticks."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def due(self, now: float) -> bool:
        """Is a trim due? Only after new connections: when none came since the last tick
        (quiet), or when the last trim is BUSY_INTERVAL old (sustained churn)."""
        n = self.accepted
        quiet = n == self._seen
        self._seen = n
        if n == self._done:
            return False
        return quiet or now - self._last >= BUSY_INTERVAL

    def trim(self) -> None:
        """Collect the cyclic garbage, then give free heap pages back (glibc)."""
        self._done = self.accepted
        self._last = self.clock()
        self.trims += 1
        gc.collect()
        if self._trim is not None:
            self._trim(0)

    def _tick(self) -> None:
        try:
            if self.due(self.clock()):
                self.trim()
        except Exception:  # a background loop never dies
            log.exception("heap trim failed")
        self._handle = asyncio.get_running_loop().call_later(TICK, self._tick)
