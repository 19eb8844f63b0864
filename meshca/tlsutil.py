"""TLS helpers shared by the CA and the sidecar: load an in-memory chain and key into an
`ssl.SSLContext`, and turn session resumption off on a server context.

Python's ssl module only loads keys from files. On Linux the chain and key go into
anonymous memory files (memfd_create) that no directory names and that close as soon
as OpenSSL has read them through /proc/self/fd: the key is never in a filesystem (while
open, /proc/<pid>/fd reaches it only for those who may read this process's memory
anyway: root, or its own user with ptrace rights), and a crash leaves nothing behind.
Where that is not available the key is written to a private directory on a
memory-backed filesystem when there is one (/dev/shm), mode 0600, and removed as soon
as OpenSSL has read it.
"""

from __future__ import annotations

import _ssl
import ctypes
import errno
import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger("meshca.tls")

_SHM = Path("/dev/shm")  # noqa: S108 (a private mkdtemp dir inside it, 0700)


def load_chain(ctx: ssl.SSLContext, chain_pem: str | bytes, key_pem: bytes) -> None:
    """Load `chain_pem` (leaf first) and its private key into `ctx` for new handshakes."""
    chain = chain_pem.encode() if isinstance(chain_pem, str) else chain_pem
    fds = _memory_files(chain, key_pem)
    if fds is None:
        _load_through_directory(ctx, chain, key_pem)
        return
    try:
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    except ssl.SSLError:
        raise  # the chain or the key is bad: no other way of loading them changes that
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM):
            raise
        _load_through_directory(ctx, chain, key_pem)  # /proc/self/fd not to be opened here
    finally:
        for fd in fds:
            os.close(fd)


def _memory_files(*contents: bytes) -> list[int] | None:
    """One anonymous memory file (memfd) per item, holding it, readable through
    /proc/self/fd; None where memfd or /proc is missing (not Linux, a seccomp profile that
    refuses the call), with nothing left open."""
    create = getattr(os, "memfd_create", None)
    if create is None or not os.path.isdir("/proc/self/fd"):
        return None
    fds: list[int] = []
    try:
        for data in contents:
            fds.append(create("meshca-tls", os.MFD_CLOEXEC))
            view = memoryview(data)
            while view:
                view = view[os.write(fds[-1], view) :]
    except OSError:
        for fd in fds:
            os.close(fd)
        return None
    return fds


def _load_through_directory(ctx: ssl.SSLContext, chain: bytes, key_pem: bytes) -> None:
    """`load_chain` through files in a private directory (0700, the key 0600) on /dev/shm
    when there is one, removed once OpenSSL has read them."""
    import tempfile  # only here: it brings shutil, bz2 and lzma (0.6 MiB resident)

    base = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="meshca-tls-", dir=base) as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_path.write_bytes(chain)
        ctx.load_cert_chain(cert_path, key_path)


_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_SESS_CACHE_SERVER = 2


def _session_cache_off(ctx: ssl.SSLContext) -> bool:
    """SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF): Python's ssl module has no
    setter for it, so it is called through ctypes on the context's SSL_CTX (the first
    field after the object header of CPython's PySSLContext), after checking that what
    is found there answers like an SSL_CTX with the default server cache mode."""
    try:
        fn = ctypes.CDLL(_ssl.__file__).SSL_CTX_ctrl  # the libssl that _ssl is linked to
        fn.restype = ctypes.c_long
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        ptr = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
        if not ptr or fn(ptr, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != _SSL_SESS_CACHE_SERVER:
            return False
        fn(ptr, _SSL_CTRL_SET_SESS_CACHE_MODE, 0, None)
        return fn(ptr, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) == 0
    except (OSError, AttributeError, ValueError):
        return False


def resumable(ctx: ssl.SSLContext, tickets: int = 1) -> None:
    """TLS session resumption on a server context: `tickets` session tickets after each full
    handshake (TLS 1.3; TLS 1.2 clients get one too), and the TLS 1.2 session cache.

    Only for a context that serves one trust generation and is then dropped: a resumed
    session skips chain verification, and tickets are sealed with keys of this context
    (and the session cache is its own), so a new context (new roots, a new certificate)
    takes every earlier session with it. The peer's certificate, from the session, must
    still be checked by the caller for revocation and expiry."""
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.num_tickets = tickets


def no_resumption(ctx: ssl.SSLContext) -> None:
    """No TLS session resumption on a server context: a resumed session skips chain
    verification, so a peer whose root was retired (or whose chain no longer verifies)
    could come back on a ticket (TLS 1.2 and 1.3) or a session ID (TLS 1.2) issued
    before. Every handshake is full."""
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    if not _session_cache_off(ctx):
        log.warning("cannot turn off the TLS 1.2 session cache here; TLS 1.2 clients may resume")
