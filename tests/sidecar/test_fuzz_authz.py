"""The policy engine under arbitrary policies and requests (hypothesis): a DENY rule that
matches always wins, whatever ALLOW rules and defaults surround it; dry-run and AUDIT rules
never change a decision; a memoized decision is the decision."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.policy.authz import Request, parse_policy

PRINCIPALS = [
    "spiffe://cluster.local/ns/a/sa/x",
    "spiffe://cluster.local/ns/b/sa/y",
    "spiffe://cluster.local/ns/a/sa/admin",
]
PATHS = ["/", "/admin", "/admin/users", "/x", "/x/y", "/Admin"]
METHODS = ["GET", "POST", "DELETE"]
REQUEST_PRINCIPALS = ["https://issuer/alice", "https://issuer/bob", "other/alice"]


def patterns(values: list[str]) -> st.SearchStrategy[list[str]]:
    """Lists of exact values, prefixes, suffixes and `*`, so rules match some requests."""
    one = st.one_of(
        st.sampled_from(values),
        st.sampled_from(values).map(lambda v: v[: max(1, len(v) // 2)] + "*"),
        st.sampled_from(values).map(lambda v: "*" + v[len(v) // 2 :]),
        st.just("*"),
    )
    return st.lists(one, min_size=1, max_size=3)


def maybe(key: str, strategy: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.one_of(st.just({}), strategy.map(lambda v: {key: v}))


from_section = st.builds(
    lambda *parts: {k: v for p in parts for k, v in p.items()},
    maybe("principals", patterns(PRINCIPALS)),
    maybe("not_principals", patterns(PRINCIPALS)),
    maybe("namespaces", patterns(["a", "b"])),
    maybe("request_principals", patterns(REQUEST_PRINCIPALS)),
)
to_section = st.builds(
    lambda *parts: {k: v for p in parts for k, v in p.items()},
    maybe("paths", patterns(PATHS).map(lambda ps: [p if p[0] in "/*" else "/" + p for p in ps])),
    maybe("not_paths", st.lists(st.sampled_from(PATHS), min_size=1, max_size=2)),
    maybe("methods", st.lists(st.sampled_from(METHODS), min_size=1, max_size=2)),
)
when = st.lists(
    st.fixed_dictionaries(
        {
            "claim": st.just("groups"),
            "values": st.lists(st.sampled_from(["ops", "dev"]), min_size=1),
        }
    ),
    max_size=1,
)
rule = st.fixed_dictionaries(
    {"action": st.sampled_from(["ALLOW", "DENY", "AUDIT"])},
    optional={"from": from_section, "to": to_section, "when": when, "dry_run": st.booleans()},
)
policies = st.fixed_dictionaries(
    {"rules": st.lists(rule, max_size=6)},
    optional={"default": st.sampled_from(["allow-authenticated", "deny"])},
)
requests = st.builds(
    Request,
    st.one_of(st.none(), st.sampled_from(PRINCIPALS)),
    st.sampled_from(PATHS),
    st.sampled_from(METHODS),
    st.one_of(st.none(), st.sampled_from(REQUEST_PRINCIPALS)),
    st.one_of(st.none(), st.fixed_dictionaries({"groups": st.sampled_from([["ops"], ["dev"]])})),
)


def named(rules: list[dict]) -> list[dict]:
    return [{**r, "name": f"r{i}"} for i, r in enumerate(rules)]


def matching_deny(r: Request) -> dict:
    """A live DENY rule that names exactly this request."""
    doc = {"action": "DENY", "to": {"paths": [r.path], "methods": [r.method]}}
    if r.principal:
        doc["from"] = {"principals": [r.principal]}
    return doc


@given(policies, requests, st.data())
def test_a_matching_deny_wins_over_any_allow(doc, r, data):
    rules = list(doc["rules"])
    at = data.draw(st.integers(0, len(rules)), label="position of the DENY")
    rules.insert(at, matching_deny(r))
    rules.append({"action": "ALLOW"})  # and an ALLOW that matches everything
    policy = parse_policy({**doc, "rules": named(rules)})
    decision = policy.decide(r)
    assert not decision.allowed
    deny_names = {x.name for x in policy.rules if x.action == "DENY" and not x.dry_run}
    assert decision.rule in deny_names


@given(policies, requests, st.lists(rule, max_size=4))
def test_adding_allow_rules_never_lifts_a_deny_rule(doc, r, extra):
    policy = parse_policy({**doc, "rules": named(doc["rules"])})
    decision = policy.decide(r)
    deny_names = {x.name for x in policy.rules if x.action == "DENY" and not x.dry_run}
    if decision.rule not in deny_names:
        return
    allows = [{**x, "action": "ALLOW"} for x in extra]
    more = parse_policy({**doc, "rules": named(doc["rules"] + allows)})
    assert not more.decide(r).allowed


@given(policies, requests, st.lists(rule, max_size=4))
def test_dry_run_and_audit_rules_change_nothing(doc, r, extra):
    base = parse_policy({**doc, "rules": named(doc["rules"])})
    inert = [
        {**x, "dry_run": True} if x["action"] != "AUDIT" else {**x, "dry_run": False} for x in extra
    ]
    more = parse_policy({**doc, "rules": named(doc["rules"] + inert)})
    a, b = base.decide(r), more.decide(r)
    assert (a.allowed, a.rule, a.reason) == (b.allowed, b.rule, b.reason)


@given(policies, st.lists(requests, min_size=1, max_size=8))
def test_memoized_decisions_are_the_decisions(doc, rs):
    policy = parse_policy({**doc, "rules": named(doc["rules"])})
    for r in rs + rs:
        claims = repr(sorted((r.claims or {}).items()))
        key = (r.principal, r.path, r.method, r.request_principal, claims)
        assert policy.decide_cached(key, lambda r=r: r) == policy.decide(r)
