"""Request-path normalization, so that policy and app see the same path (pure).

Applied to every inbound request before authentication and policy; the app then
receives the normalized path. Steps, in order (RFC 3986 sections 6.2.2 and 5.2.4):

1. Split off the query (kept byte for byte) and any fragment (dropped: a
   fragment never reaches a server, and never changes the matched path).
2. Percent-decode unreserved characters (`A-Z a-z 0-9 - . _ ~`); other escapes
   are kept, with upper-case hex. An encoded slash or backslash (`%2F`, `%5C`),
   a raw backslash, a NUL (raw or %00) or a bad escape is refused.
3. Merge runs of `/`.
4. Resolve `.` and `..` segments; a path that climbs above `/` is refused.

With `reject_semicolons` (the inbound default), a `;` or `%3B` in the path is
refused: routers that honour path parameters (Tomcat, Jetty, Spring) serve
`/admin` for `/admin;x` and `/admin` for `/x/..;/admin`, while policy would
see other paths. Letters keep their case: `/Admin` is not `/admin` (RFC 3986
6.2.2.1 folds only the scheme, host and hex digits).
"""

from __future__ import annotations

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class PathError(ValueError):
    """The path is refused (400); the message says why."""


def normalize(target: bytes, reject_semicolons: bool = False) -> tuple[bytes, bytes]:
    """(normalized path, query including its `?`, or b""); PathError if refused.

    `reject_semicolons`: refuse `;` and `%3B` in the path (not in the query).
    """
    path, qmark, query = target.partition(b"?")
    path = path.partition(b"#")[0]
    query = query.partition(b"#")[0]
    if not path.startswith(b"/"):
        raise PathError("path must start with '/'")
    # find, not `in`: `bytes in bytes` first tries the needle as an int (a TypeError,
    # made and cleared inside), which costs as much as the search on every request
    if path.find(b"%") >= 0:
        path = _decode_unreserved(path)  # escapes left are upper-case: %3b -> %3B
    if reject_semicolons and (path.find(b";") >= 0 or path.find(b"%3B") >= 0):
        raise PathError("';' in path (path parameters) is refused")
    if path.find(b"\\") >= 0:
        raise PathError("backslash in path")
    if path.find(b"\x00") >= 0:
        raise PathError("NUL in path")
    if path.find(b"//") >= 0 or path.find(b"/.") >= 0:
        path = _resolve(path)
    return path, (qmark + query if qmark else b"")


def _decode_unreserved(path: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c != 0x25:  # '%'
            out.append(c)
            i += 1
            continue
        if i + 2 >= n or path[i + 1] not in _HEX or path[i + 2] not in _HEX:
            raise PathError("bad percent-encoding in path")
        value = int(path[i + 1 : i + 3], 16)
        if value == 0:
            raise PathError("NUL in path")
        if value in (0x2F, 0x5C):
            raise PathError("encoded slash or backslash (%2F, %5C) in path")
        if value in _UNRESERVED:
            out.append(value)
        else:
            out += b"%" + path[i + 1 : i + 3].upper()
        i += 3
    return bytes(out)


def _resolve(path: bytes) -> bytes:
    segments = path.split(b"/")
    trailing = segments[-1] in (b"", b".", b"..")
    out: list[bytes] = []
    for seg in segments[1:]:
        if seg in (b"", b"."):
            continue
        if seg == b"..":
            if not out:
                raise PathError("path climbs above '/'")
            out.pop()
            continue
        out.append(seg)
    result = b"/" + b"/".join(out)
    if trailing and out:
        result += b"/"
    return result
