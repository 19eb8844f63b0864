"""meshca: a small certificate authority that issues SPIFFE X.509-SVIDs to pods."""

__version__ = "0.1.0"
