"""The key-encryption key (KEK) that seals the CA's private keys in a shared store.

With a PostgreSQL store, the CA's private keys (roots, intermediates, the join-token and
JWT-SVID signing keys) live in the database sealed with AES-256-GCM under a KEK that each
replica reads from a file (a mounted Kubernetes Secret) and that is never stored beside
them: a dump or backup of the database alone does not give the keys away.

A sealed key is `MKEK1 | kek id (8 bytes) | nonce (12) | ciphertext+tag`, and the key's
name is the additional authenticated data, so a sealed key moved to another name's row
does not open. The KEK id (the first 8 bytes of a SHA-256 of the KEK) tells "the wrong
KEK" apart from "a damaged row" in the error, without revealing anything of the KEK.

The certificates and the state record beside the keys are public, but not to be changed
by whoever can write to the database without the KEK (adding a root of theirs to the
bundle, pointing the state back at a retired intermediate): each row carries an HMAC
under a key derived from the KEK (`mac`), checked on every read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshca.errors import StateError

MAGIC = b"MKEK1"
KEK_BYTES = 32
_ID_BYTES = 8
_NONCE_BYTES = 12


@dataclass(frozen=True)
class Kek:
    """A loaded KEK (its bytes hidden from repr) and where it came from."""

    key: bytes = field(repr=False)
    source: str

    @property
    def kek_id(self) -> str:
        """A short, non-secret name of this KEK (hex)."""
        return self._id().hex()

    def _id(self) -> bytes:
        return hashlib.sha256(b"meshca-kek-id\x00" + self.key).digest()[:_ID_BYTES]

    def mac(self, *parts: bytes) -> bytes:
        """An HMAC-SHA256 over `parts` (length-prefixed, so no two lists of parts collide)
        with a key derived from the KEK: what a writer without the KEK cannot forge."""
        key = hashlib.sha256(b"meshca-kek-mac\x00" + self.key).digest()
        msg = b"".join(len(p).to_bytes(8, "big") + p for p in parts)
        return hmac.new(key, msg, hashlib.sha256).digest()

    def verify(self, tag: bytes, *parts: bytes) -> bool:
        """Does `tag` authenticate `parts`?"""
        return hmac.compare_digest(tag, self.mac(*parts))

    def seal(self, name: str, plaintext: bytes) -> bytes:
        """`plaintext` (a PEM private key) encrypted for the row named `name`."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(self.key).encrypt(nonce, plaintext, name.encode())
        return MAGIC + self._id() + nonce + sealed

    def open(self, name: str, blob: bytes) -> bytes:
        """The plaintext of a sealed key; StateError naming the key (never any key bytes)."""
        head = len(MAGIC) + _ID_BYTES + _NONCE_BYTES
        if len(blob) <= head or not blob.startswith(MAGIC):
            raise StateError(f"the stored key {name!r} is not a sealed key")
        kid = blob[len(MAGIC) : len(MAGIC) + _ID_BYTES]
        if kid != self._id():
            raise StateError(
                f"the stored key {name!r} was sealed with another key-encryption key "
                f"(id {kid.hex()}; {self.source} has id {self.kek_id})"
            )
        try:
            return AESGCM(self.key).decrypt(
                blob[head - _NONCE_BYTES : head], blob[head:], name.encode()
            )
        except InvalidTag:
            raise StateError(
                f"the stored key {name!r} does not open with the key-encryption key: "
                "the row was altered or belongs to another name"
            ) from None


def parse_kek(data: bytes, source: str) -> Kek:
    """A KEK from a file's content: 32 bytes, as base64 (`openssl rand -base64 32`), hex,
    or raw. StateError naming `source` (never the content) otherwise."""
    text = data.strip()
    candidates: list[bytes] = []
    if len(data) == KEK_BYTES and not (data.isascii() and data.decode().isprintable()):
        candidates.append(data)  # raw random bytes (a passphrase of 32 characters is not)
    try:
        candidates.append(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        pass
    try:
        candidates.append(bytes.fromhex(text.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        pass
    for key in candidates:
        if len(key) == KEK_BYTES:
            return Kek(key, source)
    raise StateError(
        f"{source} does not hold a key-encryption key: it must be {KEK_BYTES} random bytes, "
        "base64 (openssl rand -base64 32) or hex"
    )


def load_kek(path: Path) -> Kek:
    """Read the KEK file; StateError naming the file when it is missing, unreadable or wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"--kek-file: no such file {path}") from None
    except OSError as e:
        raise StateError(f"--kek-file: cannot read {path} ({e.strerror})") from None
    return parse_kek(data, f"--kek-file {path}")
