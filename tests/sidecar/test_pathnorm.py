"""Path normalization: table of what policy and the app see, and what is refused."""

import pytest

from sidecar.policy.pathnorm import PathError, normalize

OK = [
    (b"/", b"/", b""),
    (b"/admin", b"/admin", b""),
    (b"/admin/", b"/admin/", b""),
    (b"//admin", b"/admin", b""),
    (b"/./admin", b"/admin", b""),
    (b"/%61dmin", b"/admin", b""),
    (b"/%2e%2e/x", None, None),  # climbs: refused below
    (b"/public/../admin", b"/admin", b""),
    (b"/public/%2E%2E/admin", b"/admin", b""),
    (b"/admin?x=1", b"/admin", b"?x=1"),
    (b"/admin#frag", b"/admin", b""),
    (b"/admin?x=/../y#f", b"/admin", b"?x=/../y"),
    (b"/a/b/./c/../d", b"/a/b/d", b""),
    (b"/a/b/..", b"/a/", b""),
    (b"/a///b//", b"/a/b/", b""),
    (b"/caf%c3%a9", b"/caf%C3%A9", b""),
    (b"/a%20b", b"/a%20b", b""),
    (b"/%7Euser", b"/~user", b""),
]


@pytest.mark.parametrize("target,path,query", [c for c in OK if c[1] is not None])
def test_normalize(target, path, query):
    assert normalize(target) == (path, query)


REFUSED = [
    (b"/a%2Fb", "encoded slash"),
    (b"/a%2fb", "encoded slash"),
    (b"/a%5Cb", "encoded slash or backslash"),
    (b"/a\\b", "backslash"),
    (b"/..", "climbs"),
    (b"/../etc/passwd", "climbs"),
    (b"/a/../../b", "climbs"),
    (b"/%2e%2e/x", "climbs"),
    (b"/a%zz", "bad percent"),
    (b"/a%2", "bad percent"),
    (b"/a%", "bad percent"),
    (b"/a%00b", "NUL"),
    (b"admin", "must start"),
    (b"*", "must start"),
]


@pytest.mark.parametrize("target,why", REFUSED)
def test_refused(target, why):
    with pytest.raises(PathError, match=why):
        normalize(target)
