"""Which endpoint a request goes to: least request (power of two choices), round robin or
random, each honouring endpoint weights. Pure: the candidates (already filtered by subset
and outlier state) and a random source come in, one endpoint goes out."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from sidecar.upstream.endpoint import Endpoint


class Balancer(Protocol):
    """Chooses among candidates (never empty)."""

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint:
        """One of `candidates`."""


def _weighted(candidates: Sequence[Endpoint], rng: random.Random) -> Endpoint:
    total = 0
    for ep in candidates:
        total += ep.weight
    x = rng.random() * total
    for ep in candidates:
        x -= ep.weight
        if x < 0:
            return ep
    return candidates[-1]


class LeastRequest:
    """Two endpoints drawn at random (by weight); the one with fewer requests in flight per
    unit of weight wins (Envoy's default: close to the best choice at the cost of two)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()  # noqa: S311 (load spreading, not secrets)

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint:
        """The less loaded of two weighted draws."""
        if len(candidates) == 1:
            return candidates[0]
        a = _weighted(candidates, self.rng)
        b = _weighted(candidates, self.rng)
        # compare active/weight without dividing
        return a if a.active * b.weight <= b.active * a.weight else b


class RoundRobin:
    """Each request to the next endpoint in turn; an endpoint of weight w gets w turns in a
    cycle of the total weight."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint:
        """The next in turn among `candidates`."""
        total = 0
        for ep in candidates:
            total += ep.weight
        x = self._next % total
        self._next += 1
        for ep in candidates:
            x -= ep.weight
            if x < 0:
                return ep
        return candidates[-1]


class Random:
    """A weighted random draw."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()  # noqa: S311 (load spreading, not secrets)

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint:
        """One endpoint at random, by weight."""
        return _weighted(candidates, self.rng)


def make(policy: str, rng: random.Random | None = None) -> Balancer:
    """The balancer a service's `lb` names."""
    if policy == "round_robin":
        return RoundRobin()
    if policy == "random":
        return Random(rng)
    return LeastRequest(rng)
