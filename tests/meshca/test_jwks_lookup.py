"""Which JWKS key a token's `kid` gets (meshca.jwks: `FileJwks.get`, the lookup the sidecar
makes for every request with a token, cached or not).

A kid names the first key with that kid in the document; no kid names the only key, and
none when there are several; a kid the document does not have, or has only as a number,
names none. A lookup returns the same key object until the document changes (the
sidecar's verified-token cache holds a token only while its key is that same object).
"""

from __future__ import annotations

import json
import os

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.jwks import FileJwks, Jwk


def jwk(kid: object = None) -> dict:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    doc = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    if kid is not None:
        doc["kid"] = kid
    return doc


def source(tmp_path, *keys: dict) -> FileJwks:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": list(keys)}))
    return FileJwks(path, check_every=0)


def x_of(key: Jwk | None) -> int | None:
    return None if key is None else key.key.public_numbers().x


def x(doc: dict) -> int:
    return int.from_bytes(jwt.utils.base64url_decode(doc["x"]), "big")


def test_a_kid_names_the_first_key_with_it(tmp_path):
    a, b, dup = jwk("a"), jwk("b"), jwk("a")
    s = source(tmp_path, a, b, dup)
    assert x_of(s.get("a")) == x(a)  # not the later key with the same kid
    assert x_of(s.get("b")) == x(b)
    assert s.get("c") is None
    assert s.get(None) is None  # no kid, several keys: none of them


@pytest.mark.parametrize("kid", [None, "only"])
def test_no_kid_names_the_only_key(tmp_path, kid):
    only = jwk(kid)
    s = source(tmp_path, only)
    assert x_of(s.get(None)) == x(only)
    assert s.get("other") is None


@pytest.mark.parametrize("kid", [7, ["a"], {"a": 1}])
def test_a_kid_that_is_not_a_string_in_the_document_names_nothing(tmp_path, kid):
    s = source(tmp_path, jwk(kid), jwk("b"))
    assert s.get(str(kid)) is None
    assert x_of(s.get("b")) is not None


def test_the_same_key_object_until_the_document_changes(tmp_path):
    s = source(tmp_path, jwk("a"))
    first = s.get("a")
    assert first is not None and s.get("a") is first
    path = s.path
    path.write_text(json.dumps({"keys": [jwk("a")]}))
    os.utime(path, ns=(1, 1))  # a new mtime, however fast the rewrite
    again = s.get("a")
    assert again is not None and again is not first and x_of(again) != x_of(first)
    path.write_text("not json")  # a bad document keeps the last good keys
    os.utime(path, ns=(2, 2))
    assert s.get("a") is again
