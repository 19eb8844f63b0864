"""What a connection carries: the protocol names in configuration and the ALPN names on the wire.

Between sidecars the client says in the mTLS handshake what it will send, with
ALPN names of our own (Istio does the same with `istio-http/1.1`, `istio-h2`,
`istio`), so the inbound side picks an engine per connection without looking
at the bytes. A plain mTLS client (curl, HAProxy, openssl) offers `http/1.1`,
`h2` or nothing and is served as before.
"""

from __future__ import annotations

# Protocol names in configuration (`inbound.app_protocol`, `outbound.services.X.protocol`).
HTTP = "http"  # HTTP/1.1
HTTP2 = "http2"  # HTTP/2: h2c with prior knowledge to the app (gRPC), h2 over mTLS
TCP = "tcp"  # opaque bytes
ALIASES = {"http": HTTP, "http/1.1": HTTP, "http2": HTTP2, "h2": HTTP2, "grpc": HTTP2, "tcp": TCP}

# ALPN names between sidecars, and the standard ones plain clients offer.
MESH_HTTP1 = "meshca-http/1.1"
MESH_H2 = "meshca-h2"
MESH_TCP = "meshca-tcp"
HTTP1_ALPN = "http/1.1"
H2_ALPN = "h2"

# What an outbound sidecar offers, by the protocol it will speak to the other sidecar
# (`http/1.1` too, so that a sidecar that predates these names still picks HTTP/1.1).
CLIENT_ALPN = {
    HTTP: (MESH_HTTP1, HTTP1_ALPN),
    HTTP2: (MESH_H2,),
    TCP: (MESH_TCP,),
}


def accepted_alpn(app_protocol: str) -> tuple[str, ...]:
    """What the inbound listener accepts (in its order of preference) for an app speaking
    `app_protocol`. Plain clients are offered `h2` only when the app speaks HTTP/2, so an
    HTTP/1.1 app keeps HTTP/1.1 clients (curl offers both)."""
    # Another protocol's meshca-* name is accepted to be refused by name (engine_for):
    # a sidecar sending HTTP to a tcp app, or a tunnel to an HTTP app, is told at once.
    if app_protocol == TCP:
        return (MESH_TCP, MESH_HTTP1, MESH_H2)
    if app_protocol == HTTP2:
        return (MESH_H2, MESH_HTTP1, H2_ALPN, HTTP1_ALPN, MESH_TCP)
    return (MESH_HTTP1, MESH_H2, HTTP1_ALPN, MESH_TCP)


def engine_for(alpn: str | None, app_protocol: str) -> str:
    """The engine for an inbound connection: `http`, `http2` or `tcp` ("": refuse it).

    An app declared `tcp` gets every connection as bytes, but one from a sidecar that
    says it sends HTTP (the caller's service is misdeclared); an HTTP app never gets an
    opaque tunnel (its policy could not see a request)."""
    if app_protocol == TCP:
        return "" if alpn in (MESH_HTTP1, MESH_H2) else TCP
    if alpn == MESH_TCP:
        return ""
    if alpn in (MESH_H2, H2_ALPN):
        return HTTP2
    return HTTP
