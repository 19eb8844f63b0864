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
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("sidecar.heap")

TICK = 1.0  # seconds between two looks at the connection counter
BUSY_INTERVAL = 3.0  # seconds: under sustained churn, trim at most this often
T = TypeVar("T")


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


class HeapKeeper:
    """Counts accepted connections; when they stop (or every few seconds while they go on),
    frees the cyclic garbage they left and hands free heap pages back to the system."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        trim: Callable[[int], int] | None = None,
    ) -> None:
        self.accepted = 0  # connections accepted by the listeners that count
        self.trims = 0
        self.clock = clock
        self._trim = trim
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
        """Freeze what start-up made and look at the counter every TICK seconds from now."""
        if self._trim is None:
            self._trim = _glibc_trim()
        gc.collect()
        gc.freeze()  # start-up objects live as long as the process: no collection walks them
        if self._trim is not None:
            self._trim(0)  # what start-up freed (enrollment, config parsing) goes back now
        self._last = self.clock()
        self._handle = asyncio.get_running_loop().call_later(TICK, self._tick)

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
