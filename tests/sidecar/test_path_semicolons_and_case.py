"""What `;` path parameters and letter case do to policy matching (pure).

With `path_with_semicolons_action: REJECT_REQUEST` (the default) a `;` or
`%3B` anywhere in the path is refused, so `/admin;x` and `/x/..;/admin`, which
Java routers serve as `/admin`, never get past the sidecar. With ALLOW the path
is kept as is, and a DENY rule for `/admin` does not match it. Letter case is
kept: DENY `/admin` does not match `/ADMIN`, while an ALLOW list refuses it.
"""

from __future__ import annotations

import pytest

from sidecar.policy.authz import Request, parse_policy
from sidecar.policy.pathnorm import PathError, normalize

PEER = "spiffe://cluster.local/ns/default/sa/frontend"
DENY_ADMIN = parse_policy(
    {"rules": [{"name": "no-admin", "action": "DENY", "to": {"paths": ["/admin", "/admin/*"]}}]}
)
ALLOW_PUBLIC = parse_policy(
    {"rules": [{"name": "public", "action": "ALLOW", "to": {"paths": ["/public", "/public/*"]}}]}
)

SEMICOLON_PATHS = [
    b"/admin;x",
    b"/admin;jsessionid=0123",
    b"/x/..;/admin",
    b"/admin/;/",
    b"/;/admin",
    b"/admin%3Bx",
    b"/admin%3bx",
    b"/public/..;/admin?q=1",
]


@pytest.mark.parametrize("target", SEMICOLON_PATHS)
def test_semicolons_are_refused_when_asked(target):
    with pytest.raises(PathError, match="';' in path"):
        normalize(target, reject_semicolons=True)


@pytest.mark.parametrize(
    "target,path",
    [
        (b"/admin;x", b"/admin;x"),
        (b"/x/..;/admin", b"/x/..;/admin"),  # `..;` is not a dot segment here
        (b"/admin%3bx", b"/admin%3Bx"),
    ],
)
def test_semicolons_are_kept_as_is_otherwise(target, path):
    assert normalize(target)[0] == path
    assert normalize(target, reject_semicolons=False)[0] == path


def test_a_semicolon_in_the_query_is_fine():
    assert normalize(b"/public?a=1;b=2", reject_semicolons=True) == (b"/public", b"?a=1;b=2")


@pytest.mark.parametrize("target", [b"/admin;x", b"/x/..;/admin", b"/admin;/"])
def test_with_semicolons_allowed_a_deny_rule_for_admin_does_not_match(target):
    """Why REJECT_REQUEST is the default: these reach a Java app as /admin."""
    path = normalize(target)[0].decode()
    assert DENY_ADMIN.decide(Request(PEER, path, "GET")).allowed


@pytest.mark.parametrize("path", ["/ADMIN", "/Admin", "/admin/X", "/aDmin/"])
def test_letter_case_is_kept_and_matched_exactly(path):
    assert normalize(path.encode())[0].decode() == path
    # DENY /admin, /admin/* catches /admin/X but not other spellings of "admin" ...
    denied = not DENY_ADMIN.decide(Request(PEER, path, "GET")).allowed
    assert denied is path.startswith("/admin/")
    # ... while an ALLOW list refuses every spelling it does not name.
    assert not ALLOW_PUBLIC.decide(Request(PEER, path, "GET")).allowed


def test_allow_list_refuses_case_variants_of_what_it_names():
    assert ALLOW_PUBLIC.decide(Request(PEER, "/public/x", "GET")).allowed
    assert not ALLOW_PUBLIC.decide(Request(PEER, "/PUBLIC/x", "GET")).allowed
