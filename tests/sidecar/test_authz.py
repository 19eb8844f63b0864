"""Policy decisions: every match kind, DENY over ALLOW, defaults, dry_run, audit, parse errors."""

import sys

import pytest

from sidecar.policy.authz import Pattern, PolicyError, Request, parse_policy
from sidecar.policy.pathnorm import normalize

FRONT = "spiffe://cluster.local/ns/default/sa/frontend"
OTHER = "spiffe://cluster.local/ns/shop/sa/orders"


def req(principal=FRONT, path="/process", method="GET", rp=None, claims=None):
    return Request(principal, path, method, rp, claims)


@pytest.mark.parametrize(
    "pattern,value,hit",
    [
        ("/admin", "/admin", True),
        ("/admin", "/admin/", False),
        ("/admin/*", "/admin/x", True),
        ("/admin/*", "/admin/", True),
        ("/admin/*", "/admin", False),
        ("*/info", "/a/info", True),
        ("*/info", "/a/infox", False),
        ("*", "anything", True),
        ("*", "", False),
        ("*", None, False),
    ],
)
def test_patterns(pattern, value, hit):
    assert Pattern.parse(pattern).match(value) is hit


def test_star_in_the_middle_is_refused():
    with pytest.raises(PolicyError, match="may only lead or end"):
        parse_policy({"rules": [{"name": "x", "action": "ALLOW", "to": {"paths": ["/a/*/b"]}}]})


MATCH_KINDS = [
    ({"from": {"principals": [FRONT]}}, req(), True),
    ({"from": {"principals": ["cluster.local/ns/default/sa/frontend"]}}, req(), True),  # Istio form
    ({"from": {"principals": ["spiffe://cluster.local/ns/default/*"]}}, req(), True),
    ({"from": {"principals": ["*/sa/frontend"]}}, req(), True),
    ({"from": {"principals": [OTHER]}}, req(), False),
    ({"from": {"not_principals": [FRONT]}}, req(), False),
    ({"from": {"namespaces": ["default"]}}, req(), True),
    ({"from": {"namespaces": ["shop"]}}, req(), False),
    ({"from": {"not_namespaces": ["shop"]}}, req(), True),
    (
        {"from": {"request_principals": ["meshca/cluster.local/*"]}},
        req(rp="meshca/cluster.local/" + FRONT),
        True,
    ),
    ({"from": {"request_principals": ["*"]}}, req(rp=None), False),
    ({"to": {"paths": ["/process"]}}, req(), True),
    ({"to": {"paths": ["/api/*"]}}, req(path="/api/v1/x"), True),
    ({"to": {"not_paths": ["/health*"]}}, req(path="/healthz"), False),
    ({"to": {"methods": ["get", "HEAD"]}}, req(method="GET"), True),
    ({"to": {"methods": ["POST"]}}, req(method="GET"), False),
    ({"to": {"not_methods": ["DELETE"]}}, req(method="GET"), True),
    (
        {"when": [{"claim": "groups", "values": ["ops"]}]},
        req(claims={"groups": ["dev", "ops"]}),
        True,
    ),
    ({"when": [{"claim": "groups", "values": ["ops"]}]}, req(claims={"groups": ["dev"]}), False),
    (
        {"when": [{"claim": "tier", "values": ["gold", "silver"]}]},
        req(claims={"tier": "gold"}),
        True,
    ),
    (
        {"when": [{"claim": ["realm", "role"], "values": ["admin"]}]},
        req(claims={"realm": {"role": "admin"}}),
        True,
    ),
    ({"when": [{"claim": "tier", "values": ["gold"]}]}, req(claims=None), False),
    ({"when": [{"claim": "tier", "not_values": ["banned"]}]}, req(claims={"tier": "gold"}), True),
    ({"when": [{"claim": "admin", "values": [True]}]}, req(claims={"admin": True}), True),
    # every named field must match
    ({"from": {"principals": [FRONT]}, "to": {"methods": ["POST"]}}, req(), False),
]


@pytest.mark.parametrize("fields,request_,allowed", MATCH_KINDS)
def test_match_kinds_in_an_allow_rule(fields, request_, allowed):
    policy = parse_policy({"rules": [{"name": "r", "action": "ALLOW", **fields}]})
    d = policy.decide(request_)
    assert d.allowed is allowed
    assert d.rule == ("r" if allowed else None)


def test_deny_wins_over_allow():
    policy = parse_policy(
        {
            "rules": [
                {"name": "allow-all-frontend", "action": "ALLOW", "from": {"principals": [FRONT]}},
                {"name": "no-admin", "action": "DENY", "to": {"paths": ["/admin", "/admin/*"]}},
            ]
        }
    )
    d = policy.decide(req(path="/admin/users"))
    assert (d.allowed, d.rule) == (False, "no-admin") and "no-admin" in d.reason
    assert policy.decide(req(path="/process")).allowed


def test_only_deny_rules_fall_back_to_default():
    policy = parse_policy({"rules": [{"name": "d", "action": "DENY", "to": {"paths": ["/x"]}}]})
    assert policy.decide(req(path="/y")).allowed
    strict = parse_policy(
        {"default": "deny", "rules": [{"name": "d", "action": "DENY", "to": {"paths": ["/x"]}}]}
    )
    assert not strict.decide(req(path="/y")).allowed


def test_defaults_with_no_rules():
    assert parse_policy({}).decide(req()).allowed
    assert not parse_policy({}).decide(req(principal=None)).allowed
    d = parse_policy({"default": "deny"}).decide(req())
    assert not d.allowed and "default" in d.reason


def test_dry_run_changes_nothing_but_is_reported():
    policy = parse_policy(
        {
            "rules": [
                {
                    "name": "would-block",
                    "action": "DENY",
                    "dry_run": True,
                    "to": {"paths": ["/process"]},
                },
            ]
        }
    )
    d = policy.decide(req())
    assert d.allowed and d.dry_run == ("would-block: would deny",)
    allow_dry = parse_policy(
        {
            "rules": [
                {
                    "name": "only-shop",
                    "action": "ALLOW",
                    "dry_run": True,
                    "from": {"namespaces": ["shop"]},
                }
            ]
        }
    )
    d = allow_dry.decide(req())
    assert d.allowed and d.reason == "authenticated peer (default)"  # dry ALLOW is not live


def test_audit_rules_mark_but_do_not_decide():
    policy = parse_policy(
        {"rules": [{"name": "watch-process", "action": "AUDIT", "to": {"paths": ["/process"]}}]}
    )
    d = policy.decide(req())
    assert d.allowed and d.audit == ("watch-process",)


BYPASSES = [
    b"/admin",
    b"/admin/",
    b"//admin",
    b"/./admin",
    b"/%61dmin",
    b"/public/../admin",
    b"/admin?x=1",
    b"/admin#frag",
    b"/admin/./",
    b"/public/%2e%2e/admin/x",
]


@pytest.mark.parametrize("target", BYPASSES)
def test_deny_admin_is_not_bypassed_by_normalization(target):
    policy = parse_policy(
        {"rules": [{"name": "no-admin", "action": "DENY", "to": {"paths": ["/admin", "/admin/*"]}}]}
    )
    path, _ = normalize(target)
    d = policy.decide(req(path=path.decode()))
    assert not d.allowed and d.rule == "no-admin", path


BAD_POLICIES = [
    ({"rules": [{"action": "ALLOW"}]}, "rules[0].name: required"),
    ({"rules": [{"name": "a", "action": "PERMIT"}]}, "action: must be one of"),
    ({"rules": [{"name": "a", "action": "ALLOW", "to": {"path": ["/x"]}}]}, "to.path: unknown key"),
    ({"rules": [{"name": "a", "action": "ALLOW", "to": {"paths": "/x"}}]}, "non-empty list"),
    ({"rules": [{"name": "a", "action": "ALLOW", "to": {"paths": ["x"]}}]}, "must start with '/'"),
    ({"rules": [{"name": "a", "action": "ALLOW", "dry_run": "yes"}]}, "dry_run: must be true"),
    ({"rules": [{"name": "a", "action": "ALLOW"}, {"name": "a", "action": "DENY"}]}, "used twice"),
    ({"rules": [{"name": "a", "action": "ALLOW", "when": [{"claim": "g"}]}]}, "exactly one of"),
    ({"default": "allow"}, "default: must be one of"),
    ({"rulez": []}, "rulez: unknown key"),
]


@pytest.mark.parametrize("doc,message", BAD_POLICIES)
def test_bad_policies_name_the_field(doc, message):
    with pytest.raises(PolicyError) as e:
        parse_policy(doc)
    assert any(message in p for p in e.value.problems), e.value.problems


def test_decisions_are_memoized_per_policy():
    policy = parse_policy(
        {"rules": [{"name": "r", "action": "ALLOW", "from": {"principals": [FRONT]}}]}
    )
    calls = []

    def make():
        calls.append(1)
        return req()

    first = policy.decide_cached((FRONT, "/p", "GET", None), make)
    again = policy.decide_cached((FRONT, "/p", "GET", None), make)
    assert first is again and len(calls) == 1
    reloaded = parse_policy({"default": "deny"})
    assert not reloaded.decide_cached((FRONT, "/p", "GET", None), make).allowed


def test_memoized_decisions_cost_the_key_and_little_more():
    """Each distinct request (a new token each, say) keeps a cache entry; what it adds
    beyond its key is a slot in the table, not a decision and reason string of its own."""
    import gc
    import tracemalloc

    from sidecar.policy import authz

    policy = parse_policy({"rules": [{"name": "r", "action": "ALLOW"}]})
    n = authz.DECISION_CACHE - 1
    keys = [(FRONT, "/process", "GET", f"token-{i}") for i in range(n)]
    tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        got = [policy.decide_cached(k, req) for k in keys]
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base - sys.getsizeof(got)
    finally:
        tracemalloc.stop()
    assert all(d.allowed and d.rule == "r" for d in got)
    assert held / n < 100  # bytes per entry: 36 (with a decision of its own each: 210)
