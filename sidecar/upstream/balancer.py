"""Which endpoint a new upstream connection dials."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

Endpoint = tuple[str, int]  # host, port


class RoundRobin:
    """Each new connection goes to the next endpoint; a dial that fails moves on to the
    next, each endpoint tried at most once per connection."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self._next = 0

    def candidates(self) -> Iterator[Endpoint]:
        """Endpoints in the order to try them for one new connection."""
        for _ in range(len(self.endpoints)):
            ep = self.endpoints[self._next % len(self.endpoints)]
            self._next += 1
            yield ep
