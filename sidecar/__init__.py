"""sidecar: the per-pod mTLS proxy that enrolls with meshca (inbound, outbound, admin)."""

from sidecar.compiled import guard as _guard

__version__ = "0.1.0"

# The request path's compiled modules run only if built from today's sources.
_guard()
