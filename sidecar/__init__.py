"""sidecar: the per-pod mTLS proxy that enrolls with meshca (inbound, outbound, admin)."""

__version__ = "0.1.0"
