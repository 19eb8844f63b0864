"""Request principals are an issuer and a subject, not one string: with two trusted issuers
where one's name plus `/` starts the other's ("https://a" and "https://a/b"), a token from the
second with a crafted `sub` must never match a rule written for the first. A pattern that
could name either is refused when the policy loads, naming the rule."""

import pytest

from sidecar.policy.authz import Pattern, PolicyError, PrincipalPattern, Request, parse_policy

A, B = "https://a", "https://a/b"
ISSUERS = (A, B, "meshca/cluster.local")
PEER = "spiffe://cluster.local/ns/default/sa/frontend"


def policy(action, patterns, issuers=ISSUERS):
    return parse_policy(
        {"rules": [{"name": "r", "action": action, "from": {"request_principals": patterns}}]},
        issuers=issuers,
    )


def decide(p, iss, sub):
    return p.decide(Request(PEER, "/x", "GET", (iss, sub))).allowed


@pytest.mark.parametrize(
    "pattern,issuer_a,issuer_b",
    [
        ("https://a/b/c", A, B),  # (A, "b/c") or (B, "c")
        ("https://a/b/*", A, B),
        ("https://a/b*", A, B),  # subject "b..." of A, or every token of B
    ],
)
@pytest.mark.parametrize("action", ["ALLOW", "DENY"])
def test_an_ambiguous_pattern_is_refused(pattern, issuer_a, issuer_b, action):
    with pytest.raises(PolicyError) as e:
        policy(action, [pattern])
    text = " ".join(e.value.problems)
    assert "rules[0] (r).from.request_principals" in text
    assert f"could name issuer {issuer_a!r} or {issuer_b!r}" in text


def test_the_attack_fails_against_an_unambiguous_rule():
    """Only A and a third issuer are trusted where the rule was written; B is added later.
    The policy is then reloaded with B among the issuers: the rule is refused, not widened."""
    allow = policy("ALLOW", ["https://a/b/c"], issuers=(A, "meshca/cluster.local"))
    assert decide(allow, A, "b/c")
    assert not decide(allow, B, "c")  # B's token spells the same string
    with pytest.raises(PolicyError):
        policy("ALLOW", ["https://a/b/c"], issuers=(A, B))


@pytest.mark.parametrize(
    "pattern,iss,sub,hit",
    [
        ("https://a/x", A, "x", True),
        ("https://a/x", A, "y", False),
        ("https://a/x", B, "x", False),
        ("https://a/*", A, "anything", False),  # could name A or B: see below
        ("meshca/cluster.local/*", "meshca/cluster.local", PEER, True),
        ("meshca/cluster.local/*", A, "meshca/cluster.local/" + PEER, False),
        ("https://a/y*", A, "yes", True),
        ("https://a/y*", B, "yes", False),
        ("https://*", A, "x", True),  # ends inside the issuer: every https issuer
        ("https://*", B, "x", True),
        ("https://*", "meshca/cluster.local", "x", False),
        ("*", B, "x", True),
        ("*/sa/frontend", "meshca/cluster.local", PEER, True),
        ("https://c/x", "https://c", "x", False),  # an issuer that is not configured
    ],
)
def test_issuer_and_subject_are_matched_apart(pattern, iss, sub, hit):
    if pattern == "https://a/*":
        with pytest.raises(ValueError):
            PrincipalPattern.compile(Pattern.parse(pattern), ISSUERS)
        return
    compiled = PrincipalPattern.compile(Pattern.parse(pattern), ISSUERS)
    assert compiled.match((iss, sub)) is hit
    assert not compiled.match(None)
    assert not compiled.match((iss, ""))


def test_deny_on_a_bound_pattern_holds_for_its_issuer_only():
    deny = parse_policy(
        {
            "rules": [
                {"name": "no-x", "action": "DENY", "from": {"request_principals": ["https://a/x"]}},
                {"name": "all", "action": "ALLOW", "from": {"request_principals": ["*"]}},
            ]
        },
        issuers=ISSUERS,
    )
    assert not decide(deny, A, "x")
    assert decide(deny, B, "x")
    assert decide(deny, A, "y")
