"""A peer certificate's facts are read once and kept; the rules that depend on the moment
(the revocation list, the identity expected, the trust domain) are applied every time."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from meshca import pki
from meshca.spiffe import SpiffeId
from meshca.svid import SvidError
from sidecar.identity import peer as peer_mod
from sidecar.identity.peer import verify_der


def _leaf_der(sid: str) -> tuple[bytes, str]:
    now = dt.datetime.now(dt.UTC)
    rk = pki.new_key()
    root = pki.build_root(rk, now)
    ik = pki.new_key()
    inter = pki.build_intermediate(ik, root, rk, now)
    leaf = pki.build_leaf(pki.new_key().public_key(), SpiffeId.parse(sid), inter, ik, now)
    serial = format(leaf.serial_number, "x")
    return leaf.public_bytes(serialization.Encoding.DER), "0" * (len(serial) % 2) + serial


def test_a_kept_certificate_is_still_checked_against_revocation_and_identity():
    sid = "spiffe://cluster.local/ns/a/sa/b"
    der, serial = _leaf_der(sid)
    first = verify_der(der, "cluster.local", frozenset())
    assert der in peer_mod._parsed and first.spiffe_id == sid and first.serial == serial
    # revoked after it was first seen: refused from the kept facts
    with pytest.raises(SvidError) as e:
        verify_der(der, "cluster.local", frozenset({serial}))
    assert e.value.code == "revoked"
    with pytest.raises(SvidError) as e:
        verify_der(der, "cluster.local", frozenset(), SpiffeId.parse("spiffe://cluster.local/x"))
    assert e.value.code == "identity_mismatch"
    with pytest.raises(SvidError) as e:
        verify_der(der, "other.domain", frozenset())
    assert e.value.code == "foreign_trust_domain"
    again = verify_der(der, "cluster.local", frozenset())
    assert again == first


def test_a_ca_certificate_is_refused_every_time():
    now = dt.datetime.now(dt.UTC)
    key = pki.new_key()
    root = pki.build_root(key, now)
    der = root.public_bytes(serialization.Encoding.DER)
    for _ in range(2):
        with pytest.raises(SvidError):
            verify_der(der, "cluster.local", frozenset())


def test_the_kept_facts_are_bounded(monkeypatch):
    monkeypatch.setattr(peer_mod, "PARSED", 3)
    peer_mod._parsed.clear()
    for n in range(7):
        verify_der(_leaf_der(f"spiffe://cluster.local/ns/a/sa/s{n}")[0], "cluster.local", ())
        assert len(peer_mod._parsed) <= 3
