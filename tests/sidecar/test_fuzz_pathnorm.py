"""Path normalization under arbitrary targets (hypothesis): refused with PathError or
normalized once and for all, to a path in which the app, decoding it, finds no dot segment,
no empty segment and no slash that policy did not see."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.policy.authz import Request, parse_policy
from sidecar.policy.pathnorm import PathError, normalize

# Pieces that matter to normalization, mixed with arbitrary bytes.
PIECES = [
    b"/", b"//", b".", b"..", b"%2e", b"%2E", b"%2f", b"%2F", b"%5c", b"%5C", b"\\",
    b"%61", b"%41", b"%25", b"%3b", b"%3B", b";", b"%", b"%0", b"%zz", b"%00", b"\x00",
    b"?", b"#", b"~", b"%7e", b"%c3%a9", b"%20", b"-", b"_", b"admin", b"Admin", b"a", b"b",
]  # fmt: skip
piece = st.one_of(st.sampled_from(PIECES), st.binary(min_size=1, max_size=3))
targets = st.one_of(
    st.lists(piece, max_size=12).map(lambda parts: b"/" + b"".join(parts)),
    st.lists(piece, max_size=12).map(b"".join),
    st.binary(max_size=40),
)

NO_ADMIN = parse_policy(
    {"rules": [{"name": "no-admin", "action": "DENY", "to": {"paths": ["/admin", "/admin/*"]}}]}
)
PEER = "spiffe://cluster.local/ns/default/sa/frontend"


def normalized(target: bytes) -> tuple[bytes, bytes] | None:
    """The normalized (path, query), or None when refused; any other exception fails."""
    try:
        return normalize(target)
    except PathError:
        return None


def no_dot_or_empty_segments(path: bytes) -> None:
    assert path.startswith(b"/")
    assert b"//" not in path
    assert b"/./" not in path and b"/../" not in path
    assert not path.endswith((b"/.", b"/.."))


@given(targets)
@example(b"/public/%2E%2E/admin")
@example(b"/a/.%2e/b")
@example(b"/%2e")
def test_normalized_once_and_for_all(target):
    got = normalized(target)
    if got is None:
        return
    path, query = got
    no_dot_or_empty_segments(path)
    assert b"%2F" not in path.upper() and b"%5C" not in path.upper(), "no encoded slash"
    assert b"\\" not in path and b"\x00" not in path
    assert query == b"" or query.startswith(b"?")
    assert normalize(path + query) == (path, query), "idempotent"


@given(targets)
@example(b"/%61dmin")
@example(b"/x/../%61%64%6d%69%6e/%2e/secrets")
def test_the_app_decoding_the_path_sees_what_policy_saw(target):
    """What the app gets, once it percent-decodes, is as normalized as what policy matched, so
    a DENY for /admin holds whatever the encoding, and deciding again changes nothing."""
    got = normalized(target)
    if got is None:
        return
    path = got[0]
    seen_by_app = unquote_to_bytes(path)
    no_dot_or_empty_segments(seen_by_app)
    text = path.decode("latin-1")
    decision = NO_ADMIN.decide(Request(PEER, text, "GET"))
    if seen_by_app == b"/admin" or seen_by_app.startswith(b"/admin/"):
        assert not decision.allowed
    again = normalize(path)[0].decode("latin-1")
    assert NO_ADMIN.decide(Request(PEER, again, "GET")) == decision


@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_normalized_or_refused(target):
    normalized(target)  # any exception but PathError fails the test


@given(targets)
@example(b"/x/..;/admin")
@example(b"/admin%3b")
def test_refusing_semicolons_leaves_none_for_a_java_router(target):
    """With `;` refused (the inbound default), no spelling of one reaches the app's path."""
    try:
        path, _ = normalize(target, reject_semicolons=True)
    except PathError:
        return
    assert b";" not in unquote_to_bytes(path)
