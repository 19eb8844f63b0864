"""The inbound's memoized policy decisions for requests with a JWT (pure: no sockets).

A decision is memoized per (peer, path, method) and, for a request with a token in use
(one the authenticator cached), per token when some rule reads the token's claims
(`when`), else per principal (issuer, subject): a caller that gets a new token every few
minutes reuses its decision, and the cache keeps nothing for tokens seen once. What must
hold either way: two tokens of one subject with different claims are decided apart under
a policy that reads claims, and another subject is never decided as the first one was.
"""

from __future__ import annotations

import time

import jwt
import pytest
import yaml
from routerfakes import Caller, Store

from meshca.config import parse_listen
from sidecar.config import InboundConfig, PolicyConfig
from sidecar.engines.http1.exchange import Exchange
from sidecar.errors import SidecarError
from sidecar.policy.authn import Authenticator, IssuerRule
from sidecar.policy.holder import PolicyHolder
from sidecar.routing.inbound import InboundRouter
from sidecar.telemetry.record import ExchangeRecord

SECRET = b"k" * 32
ISS = "https://idp.test"


def router(tmp_path, rules: list[dict]) -> InboundRouter:
    cfg = InboundConfig(parse_listen("127.0.0.1:0"), parse_listen("127.0.0.1:5000"))
    authn = Authenticator([IssuerRule(ISS, (), None, algorithms=("HS256",), hmac_secret=SECRET)])
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"default": "deny", "rules": rules}))
    holder = PolicyHolder(PolicyConfig(path), (ISS,))
    return InboundRouter(cfg, Store(), authn, holder)


def token(sub: str, **claims: object) -> bytes:
    body = {"iss": ISS, "sub": sub, "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, SECRET).encode()


def status(r: InboundRouter, tok: bytes, path: bytes = b"/orders") -> int:
    """200 if the request would go to the app, else the status the sidecar answers."""
    headers = [(b"host", b"api"), (b"authorization", b"Bearer " + tok)]
    ex = Exchange(b"GET", path, headers, "1.1", True, ExchangeRecord("inbound"))
    try:
        r.route(Caller(), ex)
    except SidecarError as e:
        return e.status
    return 200


def test_a_policy_that_reads_claims_decides_each_token_apart(tmp_path):
    r = router(
        tmp_path,
        [{"name": "admins", "action": "ALLOW", "when": [{"claim": "role", "values": ["admin"]}]}],
    )
    admin, user = token("alice", role="admin"), token("alice", role="user")
    # the same subject, in turns: each token gets its own decision, whatever was cached
    assert [status(r, t) for t in (admin, user, admin, user)] == [200, 403, 200, 403]


def test_a_policy_of_principals_only_decides_per_principal(tmp_path):
    r = router(
        tmp_path,
        [{"name": "alice", "action": "ALLOW", "from": {"request_principals": [f"{ISS}/alice"]}}],
    )
    memo = r.policy.current._cache
    fresh = [token("alice", jti=f"t{n}", role=f"r{n}") for n in range(50)]
    assert {status(r, t) for t in fresh} == {200}
    assert len(memo) == 0  # tokens used once leave no decision behind
    # tokens in use (cached at their second verification) share their principal's decision
    first, second = token("alice", jti="first"), token("alice", jti="second")
    assert [status(r, t) for t in (first, first, second, second, first)] == [200] * 5
    assert len(memo) == 1
    # another subject is decided as itself, also after alice's decision was memoized
    for other in (token("mallory"), token("alice2")):
        assert [status(r, other) for _ in range(3)] == [403] * 3
    # one decision per principal and path, not one per token
    assert len(memo) == 3
    assert status(r, second, b"/other") == 200
    assert len(memo) == 4


def test_a_policy_of_principals_only_keeps_nothing_for_new_principals_seen_once(tmp_path):
    """A new token on every request, each of a principal of its own (one-off tokens of many
    users): no decision is kept for any of them."""
    r = router(
        tmp_path, [{"name": "any", "action": "ALLOW", "from": {"request_principals": ["*"]}}]
    )
    assert {status(r, token(f"user-{n}")) for n in range(200)} == {200}
    assert len(r.policy.current._cache) == 0


@pytest.mark.parametrize("rules_read_claims", [False, True])
def test_no_token_and_a_token_are_decided_apart(tmp_path, rules_read_claims):
    rule: dict = {"name": "jwt", "action": "ALLOW", "from": {"request_principals": [f"{ISS}/*"]}}
    if rules_read_claims:
        rule["when"] = [{"claim": "sub", "values": ["alice"]}]
    r = router(tmp_path, [rule])
    headers = [(b"host", b"api")]
    ex = Exchange(b"GET", b"/orders", headers, "1.1", True, ExchangeRecord("inbound"))
    with pytest.raises(SidecarError) as e:
        r.route(Caller(), ex)
    assert e.value.status == 401  # a token would let it through: 401, not 403
    assert status(r, token("alice")) == 200
    ex = Exchange(b"GET", b"/orders", headers, "1.1", True, ExchangeRecord("inbound"))
    with pytest.raises(SidecarError):
        r.route(Caller(), ex)


def test_a_policy_that_reads_claims_memoizes_only_tokens_in_use(tmp_path):
    """Under a policy that decides per token, a token used once (a new token on every
    request) leaves no decision behind; a token in use (the authenticator cached it, at
    its second verification) gets one, and it is the one read from then on."""
    r = router(
        tmp_path,
        [{"name": "admins", "action": "ALLOW", "when": [{"claim": "role", "values": ["admin"]}]}],
    )
    memo = r.policy.current._cache
    fresh = [token("alice", jti=f"t{n}", role="admin" if n % 2 else "user") for n in range(40)]
    assert [status(r, t) for t in fresh] == [200 if n % 2 else 403 for n in range(40)]
    assert len(memo) == 0
    reused = token("bob", role="admin")
    assert [status(r, reused) for _ in range(4)] == [200] * 4
    assert len(memo) == 1 and next(iter(memo))[3] == reused.decode()
    denied = token("carol", role="user")
    assert [status(r, denied) for _ in range(3)] == [403] * 3
    assert len(memo) == 2
