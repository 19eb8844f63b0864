"""`tlsutil.load_chain` puts a certificate chain and its private key into an SSL context
without the key ever having a path in a filesystem: on Linux it goes through anonymous
memory files (memfd) that close once OpenSSL has read them. Where those are refused
(a seccomp profile, another OS) it falls back to a private directory that is removed
afterwards. Either way the context serves handshakes with that chain, nothing is left
open or on disk, and a bad key is an `ssl.SSLError` that leaves nothing behind either.
"""

from __future__ import annotations

import errno
import fcntl
import os
import ssl
import sys
import tempfile
from pathlib import Path

import pytest
import trustme

from meshca import tlsutil

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts this process's fds in /proc (Linux)"
)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def leftovers() -> list[str]:
    """Directories named like the fallback's, where it makes them."""
    found = []
    for base in ("/dev/shm", tempfile.gettempdir()):  # noqa: S108
        if os.path.isdir(base):
            found += [n for n in os.listdir(base) if n.startswith("meshca-tls-")]
    return sorted(found)


def handshake(server_ctx: ssl.SSLContext, ca: trustme.CA, name: str) -> str:
    """A TLS handshake in memory against `server_ctx`, verifying `name`; the server
    certificate's subjectAltName as the client saw it."""
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(cin, cout, server_hostname=name)
    server = server_ctx.wrap_bio(sin, sout, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        sin.write(cout.read())
        cin.write(sout.read())
        if client.version() is not None and server.version() is not None:
            break
    cert = client.getpeercert()
    assert cert, "no handshake"
    return str(cert["subjectAltName"])


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(params=["memfd", "directory"])
def mode(request, monkeypatch) -> str:
    if request.param == "directory":

        def refused(*args, **kwargs):
            raise OSError(errno.EPERM, "memfd_create refused")

        monkeypatch.setattr(os, "memfd_create", refused)
    return request.param


def test_the_context_serves_the_chain_and_nothing_is_left(ca, mode):
    leaf = ca.issue_cert("api.default")
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    before_fds, before_dirs = open_fds(), leftovers()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tlsutil.load_chain(ctx, chain.decode(), leaf.private_key_pem.bytes())
    assert open_fds() == before_fds
    assert leftovers() == before_dirs
    assert "api.default" in handshake(ctx, ca, "api.default")


def test_the_key_has_no_path_in_any_filesystem(ca):
    """What OpenSSL is given to open is a memory file no directory names."""
    leaf = ca.issue_cert("api.default")
    seen: list[str] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    real = ctx.load_cert_chain

    class Recording(ssl.SSLContext):
        def load_cert_chain(self, certfile, keyfile=None, password=None):
            seen.extend(os.readlink(p) for p in (certfile, keyfile))
            assert Path(keyfile).read_bytes() == leaf.private_key_pem.bytes()
            return real(certfile, keyfile, password)

    ctx.__class__ = Recording
    tlsutil.load_chain(ctx, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    assert len(seen) == 2
    assert all(target.startswith("/memfd:meshca-tls") for target in seen), seen
    assert "api.default" in handshake(ctx, ca, "api.default")


@pytest.mark.parametrize(
    "bad",
    [
        b"not a key",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "other",  # a real key, of another certificate
    ],
)
def test_a_bad_key_is_an_ssl_error_that_leaves_nothing(ca, mode, bad):
    leaf = ca.issue_cert("api.default")
    key = ca.issue_cert("other").private_key_pem.bytes() if bad == "other" else bad
    before_fds, before_dirs = open_fds(), leftovers()
    with pytest.raises(ssl.SSLError):
        tlsutil.load_chain(
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), leaf.cert_chain_pems[0].bytes(), key
        )
    assert open_fds() == before_fds
    assert leftovers() == before_dirs


def test_a_refused_second_memory_file_closes_the_first(ca, monkeypatch):
    """memfd_create failing half-way (a file limit) falls back with nothing left open."""
    leaf = ca.issue_cert("api.default")
    real = os.memfd_create
    calls = []

    def second_refused(name, flags=0):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.EMFILE, "too many open files")
        return real(name, flags)

    monkeypatch.setattr(os, "memfd_create", second_refused)
    before_fds, before_dirs = open_fds(), leftovers()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tlsutil.load_chain(ctx, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    assert len(calls) == 2
    assert open_fds() == before_fds
    assert leftovers() == before_dirs
    assert "api.default" in handshake(ctx, ca, "api.default")


def test_short_writes_are_completed_and_the_files_close_on_exec(ca, monkeypatch):
    leaf = ca.issue_cert("api.default")
    real_write = os.write
    flags = []

    def one_byte(fd, data):
        flags.append(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        return real_write(fd, bytes(data[:1]))

    monkeypatch.setattr(os, "write", one_byte)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tlsutil.load_chain(ctx, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    monkeypatch.undo()
    assert len(flags) > 100 and all(flags)
    assert "api.default" in handshake(ctx, ca, "api.default")


def test_a_failed_write_or_open_falls_back_with_nothing_left(ca, monkeypatch):
    """A memory file that cannot be written (a size limit) or opened again through
    /proc/self/fd (a security module's rule): the private directory instead."""
    leaf = ca.issue_cert("api.default")
    before_fds, before_dirs = open_fds(), leftovers()

    def refused(fd, data):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(os, "write", refused)  # the fallback writes through file objects
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tlsutil.load_chain(ctx, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    monkeypatch.undo()
    assert open_fds() == before_fds
    assert leftovers() == before_dirs
    assert "api.default" in handshake(ctx, ca, "api.default")

    real = ssl.SSLContext.load_cert_chain
    opened = []

    class ProcDenied(ssl.SSLContext):
        def load_cert_chain(self, certfile, keyfile=None, password=None):
            opened.append(str(certfile))
            if str(certfile).startswith("/proc/self/fd/"):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(self, certfile, keyfile, password)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.__class__ = ProcDenied
    tlsutil.load_chain(ctx, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    assert len(opened) == 2 and opened[1].endswith("tls.crt")
    assert open_fds() == before_fds
    assert leftovers() == before_dirs
    assert "api.default" in handshake(ctx, ca, "api.default")


def test_a_bad_key_never_takes_the_fallback(ca, monkeypatch):
    """A key OpenSSL refuses is an error of the key: it is never written to a directory to
    be tried again."""
    leaf = ca.issue_cert("api.default")
    tried = []
    monkeypatch.setattr(tlsutil, "_load_through_directory", lambda *a: tried.append(a))
    for key in (b"not a key", ca.issue_cert("other").private_key_pem.bytes()):
        with pytest.raises(ssl.SSLError):
            tlsutil.load_chain(
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), leaf.cert_chain_pems[0].bytes(), key
            )
    assert tried == []


def test_another_error_opening_the_memory_files_is_raised_not_hidden(ca):
    leaf = ca.issue_cert("api.default")
    before_fds, before_dirs = open_fds(), leftovers()

    class Broken(ssl.SSLContext):
        def load_cert_chain(self, certfile, keyfile=None, password=None):
            raise OSError(errno.EIO, "Input/output error")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.__class__ = Broken
    with pytest.raises(OSError) as err:
        tlsutil.load_chain(ctx, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    assert err.value.errno == errno.EIO
    assert open_fds() == before_fds
    assert leftovers() == before_dirs
