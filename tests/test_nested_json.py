"""Deeply nested JSON from a peer ("[[[[...", a few KiB) is a clear refusal everywhere JSON is
read, never a RecursionError that becomes a 500 or kills a background task."""

import base64
import datetime as dt

import pytest

from meshca import store
from meshca.enroll import json_object
from meshca.errors import BadRequest, StateError
from meshca.jwks import parse_jwks
from meshca.trust import BundleDoc, BundleError
from sidecar.policy.authn import Authenticator, InvalidToken

DEEP = b"[" * 20_000


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "read,error",
    [
        (lambda: json_object(DEEP, {"csr"}), BadRequest),  # /v1/certificates, /v1/jwt, admin
        (lambda: BundleDoc.parse(DEEP, dt.datetime.now(dt.UTC)), BundleError),  # bundle poll
        (lambda: parse_jwks(DEEP, "the JWKS"), ValueError),  # JWKS fetch (CA and sidecar)
        (lambda: store.State.from_json(DEEP, "state.json"), StateError),
        # a JWT header or payload at the sidecar
        (lambda: Authenticator([]).verify(f"{b64(DEEP)}.{b64(b'{}')}.c2ln"), InvalidToken),
        (lambda: Authenticator([]).verify(f"{b64(b'{}')}.{b64(DEEP)}.c2ln"), InvalidToken),
    ],
)
def test_deep_nesting_is_a_clear_refusal(read, error):
    with pytest.raises(error):
        read()
