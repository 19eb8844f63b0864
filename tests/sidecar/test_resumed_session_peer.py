"""A resumed TLS session verified no chain and no dates this time: the inbound router
still refuses the certificate it carries when it is revoked or past its validity period
(and takes it when neither), for every connection. Pure: a fake transport and session."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from meshca import pki
from meshca.config import parse_listen
from meshca.spiffe import SpiffeId
from sidecar.config import InboundConfig
from sidecar.errors import SidecarError
from sidecar.routing.inbound import InboundRouter

CALLER = "spiffe://cluster.local/ns/a/sa/caller"


class Store:
    current = None
    trust_domain = "cluster.local"

    def __init__(self, revoked=frozenset()):
        self.revoked = revoked

    def on_revoked(self, fn):
        pass


class SslObject:
    def __init__(self, der: bytes, reused: bool):
        self.der, self.session_reused = der, reused

    def getpeercert(self, binary_form=False):
        return self.der


class Transport:
    def __init__(self, sslobj):
        self.sslobj = sslobj

    def get_extra_info(self, name, default=None):
        return self.sslobj if name == "ssl_object" else default


class Conn:
    def __init__(self, der: bytes, reused: bool):
        self.transport = Transport(SslObject(der, reused))


def leaf(expired: bool = False) -> tuple[bytes, str]:
    now = dt.datetime.now(dt.UTC)
    rk = pki.new_key()
    root = pki.build_root(rk, now - dt.timedelta(days=2))
    ik = pki.new_key()
    inter = pki.build_intermediate(ik, root, rk, now - dt.timedelta(days=2))
    issued, ttl = (
        (now - dt.timedelta(hours=2), dt.timedelta(hours=1))
        if expired
        else (now, dt.timedelta(hours=1))
    )
    cert = pki.build_leaf(
        pki.new_key().public_key(), SpiffeId.parse(CALLER), inter, ik, issued, ttl
    )
    if expired:
        assert cert.not_valid_after_utc < now, "the leaf must have expired"
    serial = format(cert.serial_number, "x")
    return cert.public_bytes(serialization.Encoding.DER), "0" * (len(serial) % 2) + serial


def router(revoked=frozenset()) -> InboundRouter:
    cfg = InboundConfig(parse_listen("127.0.0.1:0"), parse_listen("127.0.0.1:5000"))
    return InboundRouter(cfg, Store(revoked))  # type: ignore[arg-type]


@pytest.mark.parametrize("reused", [False, True])
def test_a_valid_certificate_is_taken_resumed_or_not(reused):
    der, _ = leaf()
    assert router().accept(Conn(der, reused)).spiffe_id == CALLER  # type: ignore[arg-type]


@pytest.mark.parametrize("reused", [False, True])
def test_a_revoked_certificate_is_refused_resumed_or_not(reused):
    der, serial = leaf()
    with pytest.raises(SidecarError) as e:
        router(frozenset({serial})).accept(Conn(der, reused))  # type: ignore[arg-type]
    assert e.value.code == "revoked"


def test_an_expired_certificate_on_a_resumed_session_is_refused():
    der, _ = leaf(expired=True)
    with pytest.raises(SidecarError) as e:
        router().accept(Conn(der, True))  # type: ignore[arg-type]
    assert e.value.code == "bad_peer_certificate" and "not valid now" in e.value.detail
