"""Load an in-memory certificate chain and key into an `ssl.SSLContext` (CA and sidecar).

Python's ssl module only loads keys from files. The key is written to a private
directory on a memory-backed filesystem when there is one (/dev/shm), mode 0600,
and removed as soon as OpenSSL has read it.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

_SHM = Path("/dev/shm")  # noqa: S108 (a private mkdtemp dir inside it, 0700)


def load_chain(ctx: ssl.SSLContext, chain_pem: str | bytes, key_pem: bytes) -> None:
    """Load `chain_pem` (leaf first) and its private key into `ctx` for new handshakes."""
    base = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
    chain = chain_pem.encode() if isinstance(chain_pem, str) else chain_pem
    with tempfile.TemporaryDirectory(prefix="meshca-tls-", dir=base) as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_path.write_bytes(chain)
        ctx.load_cert_chain(cert_path, key_path)
