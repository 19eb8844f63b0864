"""Enrollment input under arbitrary bytes (hypothesis): the JSON body and the CSR in it are
either accepted or refused with a MeshcaError the API answers with a 4xx, never another
exception (which the server would turn into a 500)."""

from __future__ import annotations

import base64
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import example, given
from hypothesis import strategies as st

from meshca import pki
from meshca.enroll import parse_request
from meshca.errors import MeshcaError


def refused_or_accepted(fn, *args):
    """fn(*args), or None if it refused with a 4xx MeshcaError; anything else fails."""
    try:
        return fn(*args)
    except MeshcaError as e:
        assert 400 <= e.status < 500, f"{type(e).__name__} {e.status}: {e.detail}"
        assert e.detail and e.code
        return None


def make_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


CSR = make_csr()
CSR_DER = base64.b64decode(b"".join(CSR.splitlines()[1:-1]))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=100).map(str.encode),
        st.dictionaries(st.sampled_from(["csr", "x", ""]), json_values, max_size=3).map(
            lambda d: json.dumps(d).encode()
        ),
        json_values.map(lambda v: json.dumps(v).encode()),
    )
)
@example(b"\xff\xfe")
@example(b'{"csr": "x", "csr": 1}')
def test_enrollment_body(body):
    csr = refused_or_accepted(parse_request, body)
    if csr is not None:
        assert isinstance(csr, str) and csr.strip()


@given(st.integers(1_000, 30_000), st.sampled_from([b"[", b'{"csr":', b'{"a":[']))
def test_deeply_nested_enrollment_body(depth, opener):
    refused_or_accepted(parse_request, opener * depth)


def pem(der: bytes, label: bytes = b"CERTIFICATE REQUEST") -> bytes:
    b64 = base64.encodebytes(der)
    return b"-----BEGIN " + label + b"-----\n" + b64 + b"-----END " + label + b"-----\n"


@st.composite
def damaged_der(draw) -> bytes:
    """The real CSR with a few bytes flipped, cut or inserted (most land in the key or sig)."""
    data = bytearray(CSR_DER)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        what = draw(st.sampled_from(["flip", "cut", "insert"]))
        if what == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif what == "cut":
            del data[at:]
            if not data:
                data.append(0x30)
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@given(
    st.one_of(
        st.binary(max_size=300).map(pem),
        damaged_der().map(pem),
        st.text(max_size=200).map(str.encode),
        st.binary(max_size=200).map(lambda b: pem(b, b"CERTIFICATE")),
        st.binary(max_size=100).map(lambda b: b"-----BEGIN CERTIFICATE REQUEST-----\n" + b),
    )
)
@example(CSR)
@example(CSR.replace(b"REQUEST-----\n", b"REQUEST-----\n\n", 1))
def test_csr(pem_bytes):
    key = refused_or_accepted(pki.check_csr, pem_bytes.decode("latin-1"))
    if key is not None:
        assert isinstance(key, ec.EllipticCurvePublicKey)
