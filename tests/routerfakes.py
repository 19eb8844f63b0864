"""Stand-ins for what the routers read, for tests that route a request without sockets:
the little of CredentialStore they use, and a client connection with a verified peer."""

from __future__ import annotations

from sidecar.identity.peer import Peer, Verdict


class Store:
    """The little of CredentialStore the routers read."""

    class current:  # noqa: N801 (the attribute CredentialStore has)
        spiffe_id = "spiffe://cluster.local/ns/b/sa/me"

    revoked: frozenset[str] = frozenset()
    trust_domain = "cluster.local"

    def on_revoked(self, fn):
        pass


class Caller:
    """A client connection whose peer presented a verified certificate."""

    peer = Peer("spiffe://cluster.local/ns/a/sa/caller", Verdict.VERIFIED, "01", "feed")
