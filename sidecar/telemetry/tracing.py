"""W3C Trace Context and `x-request-id` for one hop, pure: parse what came in, say what goes on.

- `traceparent` (https://www.w3.org/TR/trace-context/#traceparent-header):
  `00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`, lowercase hex only,
  all-zero ids invalid, version `ff` invalid, version 00 exactly 55 characters.
  A higher version is read as the spec's "Versioning of traceparent" says: its
  first four fields, if what follows the flags is nothing or a dash; it goes on
  as version 00. Two `traceparent` headers are invalid (the W3C test suite
  restarts the trace). A valid one is continued: same trace id, a new parent
  id for this hop, the flags the spec defines kept (sampled, and Level 2's
  random) and the reserved ones zeroed ("Vendors MUST set those to zero").
  Anything else starts a new trace, sampled at the configured ratio.
- `tracestate`: kept only with a valid `traceparent` (a restart drops it);
  several headers are combined; an invalid list (bad key or value, a key
  twice, more than 32 members) is dropped whole, as the W3C test suite
  expects; past 512 characters whole members are removed, those over 128
  first, then from the end (the spec's truncation rule).
- `x-request-id`: the client's, if it is 1 to 128 printable ASCII characters;
  else a new UUID4.

Ids come from `os.urandom` through a small buffer (one system call per 4 KiB:
a call per request cost about 0.8 us); a forked child starts with an empty one.
"""

from __future__ import annotations

import binascii
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.telemetry.record import ExchangeRecord

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
REQUEST_ID = b"x-request-id"
TRACE_HEADERS = frozenset({TRACEPARENT, TRACESTATE, REQUEST_ID})

SAMPLED = 0x01
RANDOM = 0x02  # Trace Context Level 2: the trace id's right 7 bytes are random
KNOWN_FLAGS = SAMPLED | RANDOM

TRACESTATE_MAX_BYTES = 512
TRACESTATE_MAX_MEMBERS = 32
_TRACESTATE_BIG_MEMBER = 128
REQUEST_ID_MAX_BYTES = 128

_HEX_OR_DASH = b"0123456789abcdef-"
_PRINTABLE = bytes(range(0x20, 0x7F))
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_FLAG_HEX = [b"%02x" % n for n in range(256)]
_FLAGS = {b"%02x" % n: n for n in range(256)}
_UUID_VARIANT = {c: b"89ab"[int(chr(c), 16) & 3 :][:1] for c in b"0123456789abcdef"}

# tracestate list members (Trace Context Level 1): a simple key, or tenant@system.
_KEYCHARS = rb"[a-z0-9_\-*/]"
_KEY = (
    rb"[a-z]" + _KEYCHARS + rb"{0,255}"
    rb"|[a-z0-9]" + _KEYCHARS + rb"{0,240}@[a-z]" + _KEYCHARS + rb"{0,13}"
)
_VALUE = rb"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER = re.compile(rb"(" + _KEY + rb")=" + _VALUE)


# A valid incoming `traceparent`: (trace id, parent id) as lowercase hex ASCII, flags as sent.
# A plain tuple: a NamedTuple cost more than the rest of the parse.
TraceParent = tuple[bytes, bytes, int]


@dataclass(slots=True, init=False)
class Hop:
    """What this hop sends on: the trace, this hop's span id, and the request id.
    (Its own `__init__`, as `ExchangeRecord`'s: one is made per request.)"""

    trace_id: bytes  # 32 lowercase hex digits
    span_id: bytes  # 16 lowercase hex digits: the parent id the next hop sees
    parent_id: bytes | None  # the caller's span id when the trace was continued
    flags: int
    tracestate: bytes | None
    request_id: bytes

    def __init__(
        self,
        trace_id: bytes,
        span_id: bytes,
        parent_id: bytes | None,
        flags: int,
        tracestate: bytes | None,
        request_id: bytes,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.flags = flags
        self.tracestate = tracestate
        self.request_id = request_id

    @property
    def sampled(self) -> bool:
        """Whether the trace is sampled."""
        return bool(self.flags & SAMPLED)

    @property
    def ids(self) -> tuple[str, str]:
        """The trace id and the request id, as the access log writes them."""
        return self.trace_id.decode("ascii"), self.request_id.decode("ascii")

    @property
    def traceparent(self) -> bytes:
        """The outgoing `traceparent` value (always version 00)."""
        return b"00-" + self.trace_id + b"-" + self.span_id + b"-" + _FLAG_HEX[self.flags]

    def stamp(self, rec: ExchangeRecord) -> bytes:
        """Write this hop's ids into `rec` (as the access log shows them); its head lines."""
        rec.trace_id = self.trace_id.decode("ascii")
        rec.request_id = self.request_id.decode("ascii")
        rec.span_id = self.span_id.decode("ascii")
        if self.parent_id is not None:
            rec.parent_span_id = self.parent_id.decode("ascii")
        rec.sampled = bool(self.flags & SAMPLED)
        return self.header_lines()

    def header_lines(self) -> bytes:
        """`traceparent`, `tracestate` (if kept) and `x-request-id` as head lines."""
        flags = _FLAG_HEX[self.flags]
        if self.tracestate is None:
            return b"traceparent: 00-%s-%s-%s\r\nx-request-id: %s\r\n" % (
                self.trace_id,
                self.span_id,
                flags,
                self.request_id,
            )
        return b"traceparent: 00-%s-%s-%s\r\ntracestate: %s\r\nx-request-id: %s\r\n" % (
            self.trace_id,
            self.span_id,
            flags,
            self.tracestate,
            self.request_id,
        )


def parse_traceparent(value: bytes) -> TraceParent | None:
    """The trace context in a `traceparent` value, or None if it is not valid."""
    v = value.strip(b" \t")
    if len(v) != 55:
        # Only a higher version may be longer: its first four fields, then a dash.
        if len(v) < 55 or v[:2] == b"00" or v[:2] == b"ff" or v[55] != 0x2D:
            return None
        v = v[:55]
    elif v[:2] == b"ff":
        return None
    # Three dashes where they belong and nothing but lowercase hex besides.
    if v[2] != 0x2D or v[35] != 0x2D or v[52] != 0x2D or v.count(b"-") != 3:
        return None
    if v.translate(None, _HEX_OR_DASH):
        return None
    trace_id, parent_id = v[3:35], v[36:52]
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, _FLAGS[v[53:]]


def parse_tracestate(values: Sequence[bytes]) -> bytes | None:
    """The `tracestate` headers combined, checked and capped; None if invalid or empty."""
    members: list[bytes] = []
    keys: set[bytes] = set()
    for value in values:
        for raw in value.split(b","):
            member = raw.strip(b" \t")
            if not member:  # empty members are allowed (and not passed on)
                continue
            m = _MEMBER.fullmatch(member)
            if m is None:
                return None
            key = m.group(1)
            if key in keys or len(members) == TRACESTATE_MAX_MEMBERS:
                return None
            keys.add(key)
            members.append(member)
    if not members:
        return None
    size = sum(map(len, members)) + len(members) - 1
    while size > TRACESTATE_MAX_BYTES:
        big = [i for i, m in enumerate(members) if len(m) > _TRACESTATE_BIG_MEMBER]
        drop = members.pop(big[-1] if big else -1)
        size -= len(drop) + 1
    return b",".join(members) if members else None


def keep_request_id(value: bytes | None) -> bytes | None:
    """The client's `x-request-id` if it is 1 to 128 printable ASCII characters, else None."""
    if value and len(value) <= REQUEST_ID_MAX_BYTES and not value.translate(None, _PRINTABLE):
        return value
    return None


def sampling_threshold(ratio: float) -> int:
    """The bound a new trace id's low 64 bits are compared with: `ratio` of them are below."""
    return min(max(round(ratio * 2**64), 0), 2**64)


class _RandomBytes:
    """`os.urandom` read 4 KiB at a time (from the event loop's thread only); a forked child
    starts afresh."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        pos = self._pos
        if pos + n > len(self._buf):
            self._buf, pos = os.urandom(4096), 0
        self._pos = pos + n
        return self._buf[pos : pos + n]

    def reset(self) -> None:
        self._buf, self._pos = b"", 0


_random = _RandomBytes()
os.register_at_fork(after_in_child=_random.reset)


def new_span_id() -> bytes:
    """A random, non-zero span id (16 hex digits)."""
    while True:
        raw = _random.take(8)
        if any(raw):
            return binascii.hexlify(raw)


def new_trace(threshold: int) -> tuple[bytes, bytes, int]:
    """A random trace id (32 hex digits) and span id (16), neither zero, and the flags:
    sampled if the trace id's low 64 bits are below `threshold`."""
    while True:
        raw = _random.take(24)
        if any(raw[:16]) and any(raw[16:]):
            sampled = int.from_bytes(raw[8:16], "big") < threshold
            ids = binascii.hexlify(raw)
            return ids[:32], ids[32:], SAMPLED if sampled else 0


def new_request_id() -> bytes:
    """A random UUID4, as text (version digit 4, variant digit 8, 9, a or b)."""
    h = binascii.hexlify(_random.take(16))
    return b"%s-%s-4%s-%s%s-%s" % (
        h[:8],
        h[8:12],
        h[13:16],
        _UUID_VARIANT[h[16]],
        h[17:20],
        h[20:],
    )


_ZERO_16 = bytes(16)
_ZERO_8 = bytes(8)


def _new_hop(threshold: int) -> Hop:
    """A new trace, span and request id from one draw of random bytes (a request with no
    trace headers, the common case: half the cost of drawing each apart)."""
    while True:
        raw = _random.take(40)
        if raw[:16] != _ZERO_16 and raw[16:24] != _ZERO_8:
            break
    h = binascii.hexlify(raw)
    flags = SAMPLED if int.from_bytes(raw[8:16], "big") < threshold else 0
    r = h[48:]
    rid = b"%s-%s-4%s-%s%s-%s" % (r[:8], r[8:12], r[13:16], _UUID_VARIANT[r[16]], r[17:20], r[20:])
    return Hop(h[:32], h[32:48], None, flags, None, rid)


def next_hop(found: Sequence[tuple[bytes, bytes]], threshold: int) -> Hop:
    """This hop's trace context from the request's trace headers (lowercase names, in order):
    the caller's trace continued when its `traceparent` is valid, else a new one."""
    if not found:
        return _new_hop(threshold)
    traceparent = None
    count = 0
    states: list[bytes] = []
    request_id = None
    for name, value in found:
        if name == TRACEPARENT:
            traceparent, count = value, count + 1
        elif name == TRACESTATE:
            states.append(value)
        elif request_id is None:
            request_id = value
    rid = keep_request_id(request_id) or new_request_id()
    parent = parse_traceparent(traceparent) if count == 1 and traceparent is not None else None
    if parent is None:
        trace_id, span_id, flags = new_trace(threshold)
        return Hop(trace_id, span_id, None, flags, None, rid)
    trace_id, parent_id, flags = parent
    state = parse_tracestate(states) if states else None
    return Hop(trace_id, new_span_id(), parent_id, flags & KNOWN_FLAGS, state, rid)


def log_ids(headers: Iterable[tuple[bytes, bytes]], threshold: int) -> tuple[str, str]:
    """The trace and request ids of a request refused before a router's pass over its
    headers (which collects the trace headers itself): for its access-log line."""
    found = [(k, v) for k, v in headers if k in TRACE_HEADERS]
    return next_hop(found, threshold).ids
