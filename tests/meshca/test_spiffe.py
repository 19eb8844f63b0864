"""SPIFFE ID parsing follows the spec: table of accepted and refused IDs."""

import pytest

from meshca.spiffe import InvalidSpiffeId, SpiffeId

GOOD = [
    ("spiffe://cluster.local/ns/default/sa/web", "cluster.local", "/ns/default/sa/web"),
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://td_1-x.y/a.b/c-d/e_f", "td_1-x.y", "/a.b/c-d/e_f"),
]

BAD = [
    ("http://cluster.local/ns/a", "must start with 'spiffe://'"),
    ("SPIFFE://cluster.local/ns/a", "must start with 'spiffe://'"),
    ("spiffe://Cluster.local/ns/a", "lowercase"),
    ("spiffe://cluster.local:8443/ns/a", "port"),
    ("spiffe://user@cluster.local/ns/a", "user info"),
    ("spiffe:///ns/a", "trust domain is empty"),
    ("spiffe://cluster.local/ns//a", "empty segments"),
    ("spiffe://cluster.local/ns/a/", "empty segments"),
    ("spiffe://cluster.local/ns/../a", "'.' or '..'"),
    ("spiffe://cluster.local/ns/./a", "'.' or '..'"),
    ("spiffe://cluster.local/ns/a%2Fb", "letters, digits"),
    ("spiffe://cluster.local/ns/a?x=1", "query or fragment"),
    ("spiffe://cluster.local/ns/a#f", "query or fragment"),
    ("spiffe://" + "a" * 256, "longer than 255"),
]


@pytest.mark.parametrize("text,td,path", GOOD)
def test_parse_good(text, td, path):
    sid = SpiffeId.parse(text)
    assert (sid.trust_domain, sid.path, str(sid)) == (td, path, text)


@pytest.mark.parametrize("text,why", BAD)
def test_parse_bad(text, why):
    with pytest.raises(InvalidSpiffeId, match=None) as e:
        SpiffeId.parse(text)
    assert why in str(e.value)


def test_service_account_form():
    sid = SpiffeId.for_service_account("cluster.local", "shop", "orders")
    assert str(sid) == "spiffe://cluster.local/ns/shop/sa/orders" and sid.is_workload
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.for_service_account("cluster.local", "a/b", "x")
