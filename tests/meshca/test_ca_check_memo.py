"""The check that the server a sidecar polls is the CA (its SPIFFE ID, right after each
handshake) reads a certificate's URI SANs once per certificate: a bundle poll every half
minute then runs no X.509 parse (which would map cryptography's code back into a sidecar
that released it; tests/e2e/test_settled_file_pages.py). The answers stay those of a
fresh parse: the names, none for a certificate without the extension or that does not
parse, and a new certificate is parsed anew."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import meshca.client as client
from meshca import pki
from meshca.spiffe import SpiffeId

NOW = dt.datetime.now(dt.UTC)
CA_ID = "spiffe://cluster.local/ns/mesh-system/sa/meshca"


def leaf_der(spiffe_id: str) -> bytes:
    root_key = pki.new_key()
    root = pki.build_root(root_key, NOW)
    leaf = pki.build_leaf(
        pki.new_key().public_key(),
        SpiffeId.parse(spiffe_id),
        root,
        root_key,
        NOW,
        dt.timedelta(hours=1),
    )
    return leaf.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def parses(monkeypatch):
    client._SANS.clear()
    count = []
    real = x509.load_der_x509_certificate

    def counting(der: bytes):
        count.append(1)
        return real(der)

    monkeypatch.setattr(client.x509, "load_der_x509_certificate", counting)
    return count


def test_a_certificate_is_parsed_once(parses):
    der = leaf_der(CA_ID)
    assert [client._uri_sans(der) for _ in range(5)] == [[CA_ID]] * 5
    assert len(parses) == 1
    other = leaf_der("spiffe://cluster.local/ns/a/sa/b")
    assert client._uri_sans(other) == ["spiffe://cluster.local/ns/a/sa/b"]
    assert len(parses) == 2


def test_garbage_or_nothing_names_nothing_every_time(parses):
    assert client._uri_sans(b"\x30\x03\x02\x01\x00") == []
    assert client._uri_sans(b"\x30\x03\x02\x01\x00") == []
    assert client._uri_sans(None) == [] and client._uri_sans(b"") == []
    assert len(parses) == 1


def test_the_memo_is_bounded(parses):
    for i in range(client._SANS_KEPT + 3):
        client._uri_sans(b"\x30\x03\x02\x01" + bytes([i]))
    assert len(client._SANS) <= client._SANS_KEPT


def test_a_caller_changing_the_answer_does_not_change_the_memo(parses):
    der = leaf_der(CA_ID)
    client._uri_sans(der).append("spiffe://evil/x")
    assert client._uri_sans(der) == [CA_ID]
