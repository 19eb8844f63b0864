"""Route matching for an outbound service, pure: which route a request takes, which subset
its traffic goes to (weighted), and which faults it gets.

Routes are tried in order and the first whose match holds wins; no match sends the
request to every endpoint. A match holds when every header condition holds (exact,
prefix or regex on the first value), the path matches (exact or prefix, on the path
without the query) and the method is listed (if any are). The draw for a weighted
split and for fault percentages comes from the random source passed in, so tests can
fix it. A request may force a route's configured faults with `x-sidecar-fault: abort`,
`delay` or `abort, delay`, whatever their percentages (for resilience tests, 0 % gives
faults on demand only); the header is never forwarded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.trafficconfig import Destination, HeaderMatch, RouteConfig, RouteMatch

FAULT_HEADER = b"x-sidecar-fault"


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and what it suffers on the way."""

    route: str | None  # the route's name, None when no route matched
    subset: str | None
    delay: float = 0.0
    abort: int | None = None  # a status to answer with instead of forwarding


NO_ROUTE = Decision(None, None)


def matches(
    m: RouteMatch, method: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> bool:
    """Whether a request (`path` without the query) meets every condition of `m`."""
    return _Compiled.of(m).holds(method, path, _first_values(headers))


def _first_values(headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Header names (lowercase) to their first value."""
    out: dict[bytes, bytes] = {}
    for k, v in headers:
        k = k.lower()
        if k not in out:
            out[k] = v
    return out


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A match in the form the request path compares fastest (bytes, no decoding)."""

    methods: frozenset[bytes]
    exact: bytes | None
    prefix: bytes | None
    headers: tuple[HeaderMatch, ...]

    @staticmethod
    def of(m: RouteMatch) -> _Compiled:
        return _Compiled(
            frozenset(x.encode("ascii") for x in m.methods),
            m.path_exact.encode("ascii") if m.path_exact is not None else None,
            m.path_prefix.encode("ascii") if m.path_prefix is not None else None,
            m.headers,
        )

    def holds(self, method: bytes, path: bytes, headers: dict[bytes, bytes]) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.exact is not None and path != self.exact:
            return False
        if self.prefix is not None and not path.startswith(self.prefix):
            return False
        for hm in self.headers:
            value = headers.get(hm.name)
            if value is None or not hm.matches(value):
                return False
        return True


# One row a route: (methods, exact path, path prefix, header matches, route, and the
# decision for each destination when the route injects no fault), paths in bytes.
_Row = tuple[
    frozenset[bytes],
    bytes | None,
    bytes | None,
    tuple[HeaderMatch, ...],
    RouteConfig,
    tuple[Decision, ...],
]
_compiled: dict[int, tuple[Sequence[RouteConfig], list[_Row]]] = {}


def _compile(routes: Sequence[RouteConfig]) -> list[_Row]:
    """A route table as rows to test a request against (kept per table: tables never
    change while the sidecar runs)."""
    hit = _compiled.get(id(routes))
    if hit is not None and hit[0] is routes:
        return hit[1]
    rows = []
    for r in routes:
        c = _Compiled.of(r.match)
        plain = tuple(Decision(r.name, d.subset) for d in r.to)
        rows.append((c.methods, c.exact, c.prefix, c.headers, r, plain))
    _compiled[id(routes)] = (routes, rows)
    return rows


def choose(to: Sequence[Destination], draw: float) -> str | None:
    """The subset a draw in [0, 1) falls on, by weight."""
    return to[_index(to, draw)].subset


def _index(to: Sequence[Destination], draw: float) -> int:
    if len(to) == 1:
        return 0
    total = sum(d.weight for d in to)
    x = draw * total
    for n, d in enumerate(to):
        x -= d.weight
        if x < 0:
            return n
    return len(to) - 1


def forced_faults(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[str]:
    """The faults a request asks for in `x-sidecar-fault`."""
    for k, v in headers:
        if k.lower() == FAULT_HEADER:
            return frozenset(t.strip().decode("latin-1").lower() for t in v.split(b","))
    return frozenset()


def decide(
    routes: Sequence[RouteConfig],
    method: bytes,
    path: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    rng: random.Random,
) -> Decision:
    """The first matching route's decision (NO_ROUTE when none matches)."""
    hdrs: dict[bytes, bytes] | None = None
    for methods, exact, prefix, wanted, route, plain in _compile(routes):  # the hot path
        if methods and method not in methods:
            continue
        if exact is not None and path != exact:
            continue
        if prefix is not None and not path.startswith(prefix):
            continue
        if wanted:
            if hdrs is None:
                hdrs = _first_values(headers)
            for hm in wanted:
                value = hdrs.get(hm.name)
                if value is None or not hm.matches(value):
                    break
            else:
                wanted = ()
            if wanted:
                continue
        f = route.fault
        if f is None:
            if len(plain) == 1:
                return plain[0]
            return plain[_index(route.to, rng.random())]
        subset = choose(route.to, rng.random())
        forced = forced_faults(headers)  # even at 0 %: faults on demand only
        delay = 0.0
        if f.delay_seconds and ("delay" in forced or rng.random() * 100 < f.delay_percent):
            delay = f.delay_seconds
        abort = None
        if f.abort_status is not None and (
            "abort" in forced or rng.random() * 100 < f.abort_percent
        ):
            abort = f.abort_status
        return Decision(route.name, subset, delay, abort)
    return NO_ROUTE
