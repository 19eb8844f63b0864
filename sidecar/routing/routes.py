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

from sidecar.trafficconfig import Destination, RouteConfig, RouteMatch

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
    if m.methods and method.decode("latin-1") not in m.methods:
        return False
    if m.path_exact is not None and path.decode("latin-1") != m.path_exact:
        return False
    if m.path_prefix is not None and not path.decode("latin-1").startswith(m.path_prefix):
        return False
    for hm in m.headers:
        for k, v in headers:
            if k.lower() == hm.name:
                if not hm.matches(v):
                    return False
                break
        else:
            return False
    return True


def choose(to: Sequence[Destination], draw: float) -> str | None:
    """The subset a draw in [0, 1) falls on, by weight."""
    if len(to) == 1:
        return to[0].subset
    total = sum(d.weight for d in to)
    x = draw * total
    for d in to:
        x -= d.weight
        if x < 0:
            return d.subset
    return to[-1].subset


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
    for route in routes:
        if not matches(route.match, method, path, headers):
            continue
        subset = choose(route.to, rng.random())
        f = route.fault
        if f is None:
            return Decision(route.name, subset)
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
