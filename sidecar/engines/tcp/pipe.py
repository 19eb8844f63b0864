"""An opaque byte pipe: two connected transports joined, each one's bytes written to the other.

Used wherever the sidecar stops understanding the bytes: opaque TCP through the mesh
(Redis, PostgreSQL), WebSocket after `101 Switching Protocols`, an HTTP `CONNECT`
tunnel. `splice` takes both transports over from whatever protocol owned them
(`set_protocol`) and copies until both are gone:

- flow control: a side whose write buffer is over its high-water mark stops the reading
  of the other side, so a fast sender and a slow reader cost bounded memory;
- end of stream: when both transports are plain TCP an EOF is passed on (`write_eof`)
  and the other direction goes on (a true half-close). A TLS transport cannot
  half-close (asyncio and uvloop shut it down after its peer's close_notify, whatever
  `eof_received` returns), so there an EOF closes both sides, each after its buffer
  is flushed;
- a side that is lost takes the other with it: gracefully (flushed) after a clean close,
  at once (`abort`) after an error;
- idle timeout: no byte moved either way (read, or flushed from a write buffer) for
  `idle_timeout` seconds closes both, checked by the shared deadline sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sidecar.engines.base import DEADLINES, SWEEP_INTERVAL

log = logging.getLogger(__name__)


class PipeEnd(asyncio.Protocol):
    """One side of a pipe, the protocol of its transport: what it reads goes to the other side."""

    def __init__(self, pipe: Pipe, transport: asyncio.Transport) -> None:
        self.pipe = pipe
        self.transport: asyncio.Transport | None = transport  # None once lost
        self.peer: PipeEnd = self
        self.bytes_read = 0  # and written to the other side
        self.eof = False  # this side has sent everything it will send
        # Our write buffer is full: the other side is not read. A previous owner may
        # have left it full; the transport then tells us resume_writing, never pause.
        high = transport.get_write_buffer_limits()[1]
        self.write_paused = transport.get_write_buffer_size() > high

    def data_received(self, data: bytes) -> None:
        """Pass bytes on."""
        out = self.peer.transport
        if out is not None:
            self.bytes_read += len(data)
            out.write(data)

    def eof_received(self) -> bool:
        """Pass the EOF on; True (stay open for writing) only for a half-close."""
        self.eof = True
        mine, out = self.transport, self.peer.transport
        if out is None or out.is_closing():
            return False
        if self.peer.eof or mine is None or not (mine.can_write_eof() and out.can_write_eof()):
            out.close()  # both directions done, or TLS: close (after a flush) both
            return False
        out.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """Close the other side: gracefully after a clean close, at once after an error."""
        if self.transport is None:
            return
        self.transport = None
        out = self.peer.transport
        if out is not None:
            if exc is None:
                out.close()
            else:
                out.abort()
        self.pipe._end_lost()

    def pause_writing(self) -> None:
        """Our transport is over its high-water mark: stop reading the other side."""
        self.write_paused = True
        self.peer._set_reading(False)

    def resume_writing(self) -> None:
        """Our transport drained: read the other side again."""
        self.write_paused = False
        self.peer._set_reading(True)

    def _set_reading(self, on: bool) -> None:
        # Pause and resume are idempotent on both loops, but a side past its EOF must
        # stay unread: paused and resumed, a half-closed transport reports its EOF again.
        t = self.transport
        if t is None or self.eof or t.is_closing():
            return
        if on:
            t.resume_reading()
        else:
            t.pause_reading()


class Pipe:
    """Two transports joined: bytes read from one are written to the other."""

    def __init__(
        self,
        a: asyncio.Transport,
        b: asyncio.Transport,
        idle_timeout: float,
        on_close: Callable[[Pipe], None] | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.a = PipeEnd(self, a)  # the downstream (client) side
        self.b = PipeEnd(self, b)  # the upstream (server) side
        self.a.peer, self.b.peer = self.b, self.a
        self.closed = False  # both transports are gone
        self.started = self._loop.time()
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self._step = max(idle_timeout / 4, SWEEP_INTERVAL)  # how late an idle close may be
        self._last = self.started  # when bytes were last seen moving (to a step)
        self._seen = (0, 0, 0, 0)  # the progress then
        self.deadline = self.started + min(idle_timeout, self._step)
        self.on_deadline: Callable[[], None] | None = self._check_idle

    @property
    def bytes_a_to_b(self) -> int:
        """Bytes read from `a` and written to `b`."""
        return self.a.bytes_read

    @property
    def bytes_b_to_a(self) -> int:
        """Bytes read from `b` and written to `a`."""
        return self.b.bytes_read

    def close(self) -> None:
        """Close both sides, each after its write buffer is flushed."""
        for end in (self.a, self.b):
            if end.transport is not None:
                end.transport.close()

    def abort(self) -> None:
        """Close both sides now, dropping what is buffered."""
        for end in (self.a, self.b):
            if end.transport is not None:
                end.transport.abort()

    def _progress(self) -> tuple[int, int, int, int]:
        """What changes while bytes move: read counts and write buffer sizes (a draining
        buffer is a slow reader catching up, not an idle one)."""
        ta, tb = self.a.transport, self.b.transport
        return (
            self.a.bytes_read,
            self.b.bytes_read,
            ta.get_write_buffer_size() if ta is not None else 0,
            tb.get_write_buffer_size() if tb is not None else 0,
        )

    def _check_idle(self) -> None:
        """Run by the sweep: no timer per read; a read only bumps a counter."""
        now = self._loop.time()
        progress = self._progress()
        if progress != self._seen:
            self._seen, self._last = progress, now
        elif now >= self._last + self.idle_timeout:
            log.debug("pipe idle for %.1f s: closing", now - self._last)
            for t in (self.a.transport, self.b.transport):
                if t is not None and t.get_write_buffer_size():
                    t.abort()  # a buffer that did not move in all that time never will
                elif t is not None:
                    t.close()
            return
        self.deadline = min(self._last + self.idle_timeout, now + self._step)
        self.on_deadline = self._check_idle

    def _end_lost(self) -> None:
        if self.closed or self.a.transport is not None or self.b.transport is not None:
            return
        self.closed = True
        self.on_deadline = None
        DEADLINES.discard(self)
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            try:
                on_close(self)
            except Exception:  # the caller's bug must not reach the transport's callback
                log.exception("on_close of a pipe failed")


def splice(
    a: asyncio.Transport,
    b: asyncio.Transport,
    *,
    idle_timeout: float,
    a_pending: bytes = b"",
    b_pending: bytes = b"",
    on_close: Callable[[Pipe], None] | None = None,
) -> Pipe:
    """Join `a` (downstream) and `b` (upstream) until both are closed.

    `a_pending` and `b_pending` were already read from `a` and `b` by their previous
    owner and are sent on first. Reading is resumed on both (a previous owner may have
    paused it). `on_close` runs once, when both transports are gone; it must not raise
    (an exception is logged).
    """
    pipe = Pipe(a, b, idle_timeout, on_close)
    a.set_protocol(pipe.a)
    b.set_protocol(pipe.b)
    loop = pipe._loop
    for src, dst, pending in ((pipe.a, b, a_pending), (pipe.b, a, b_pending)):
        if pending and not dst.is_closing():
            src.data_received(pending)
    pipe._seen = pipe._progress()
    DEADLINES.add(pipe)
    for end in (pipe.a, pipe.b):
        if end.transport is not None and end.transport.is_closing():
            # Its connection_lost may have gone to the previous owner already: the
            # pipe's own call comes first (and a later one from the transport is ignored).
            loop.call_soon(end.connection_lost, None)
        else:
            end._set_reading(not end.peer.write_paused)
    return pipe
