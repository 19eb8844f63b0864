"""meshca.p256: ES256 verified from a table of the key answers exactly as OpenSSL's ECDSA
(through `cryptography`) does, for valid signatures, tampered ones, out-of-range r and s,
and the cases that trip implementations: u1 = 0, u1·G = u2·Q (the sum doubles), R at
infinity, and x(R) of n or more. Signatures are made here from the private key's
numbers, so the digest can be any value (0, n, more than n)."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import secrets
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca import jwtcore, p256

N = p256.N
P = 2**256 - 2**224 + 2**192 + 2**96 - 1
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_G = ec.derive_private_key(1, ec.SECP256R1()).public_key().public_numbers()
GX, GY = _G.x, _G.y


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _tables_here() -> bool:
    """Can this platform's libcrypto (the one `ssl` loaded) build a table at all?"""
    try:
        p256.Verifier(_point(ec.generate_private_key(ec.SECP256R1()).public_key())).close()
    except p256.Unavailable:
        return False
    return True


# Another platform's Python, without libcrypto 3 or its EC calls: the tables are off there
# (cryptography verifies every token) and nothing here applies.
pytestmark = pytest.mark.skipif(
    not _tables_here(), reason="the system's libcrypto cannot build P-256 tables here"
)


def _verifier(key: ec.EllipticCurvePublicKey) -> p256.Verifier:
    return p256.Verifier(_point(key))


def _oracle(key: ec.EllipticCurvePublicKey, e: int, r: int, s: int) -> bool:
    """OpenSSL's own ECDSA verification (cryptography, prehashed digest)."""
    try:
        key.verify(
            encode_dss_signature(r, s), e.to_bytes(32, "big"), ec.ECDSA(Prehashed(hashes.SHA256()))
        )
    except InvalidSignature:
        return False
    return True


def _fast(v: p256.Verifier, e: int, r: int, s: int) -> bool | None:
    return v.verify(e.to_bytes(32, "big"), r.to_bytes(32, "big"), s.to_bytes(32, "big"))


def _k_times_g(k: int) -> int:
    """x of k·G, from cryptography."""
    return ec.derive_private_key(k, ec.SECP256R1()).public_key().public_numbers().x


def _sign(d: int, e: int, k: int | None = None) -> tuple[int, int]:
    """An ECDSA signature of the digest value `e` (any 256-bit number) with private d."""
    while True:
        k = k or secrets.randbelow(N - 1) + 1
        r = _k_times_g(k) % N
        s = pow(k, -1, N) * (e + r * d) % N
        if r and s:
            return r, s
        k = None


def _verifier_with_openssl_inverse(key: ec.EllipticCurvePublicKey) -> p256.Verifier:
    """A verifier that takes s⁻¹ from OpenSSL (`BN_mod_inverse`), as where GMP is not
    there."""
    real = p256._libgmp
    p256._libgmp = lambda: None
    try:
        return _verifier(key)
    finally:
        p256._libgmp = real


def _gmp_here() -> bool:
    """Is there a libgmp.so.10 with 64-bit little-endian limbs here (so p256 must use it)?
    Asked of the library itself, not of p256, so that a broken binding fails, not skips."""
    try:
        lib = ctypes.CDLL("libgmp.so.10")
    except OSError:
        return False
    return sys.byteorder == "little" and ctypes.c_int.in_dll(lib, "__gmp_bits_per_limb").value == 64


NEEDS_GMP = pytest.mark.skipif(
    not _gmp_here(), reason="no libgmp.so.10 with 64-bit little-endian limbs here"
)


@pytest.fixture(
    scope="module", params=[pytest.param("gmp-inverse", marks=NEEDS_GMP), "openssl-inverse"]
)
def pair(request: pytest.FixtureRequest) -> tuple[int, ec.EllipticCurvePublicKey, p256.Verifier]:
    """(d, Q, a verifier of Q): each test runs with either inverse modulo n."""
    private = ec.generate_private_key(ec.SECP256R1())
    d = private.private_numbers().private_value
    if request.param == "openssl-inverse":
        v = _verifier_with_openssl_inverse(private.public_key())
        assert v._gmp_inverse is None
    else:
        v = _verifier(private.public_key())
        assert v._gmp_inverse is not None
    return d, private.public_key(), v


def test_gmp_is_not_used_where_its_limbs_are_big_endian(monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers go into GMP's limbs as little-endian bytes: on a big-endian host (s390x)
    that would be other numbers, so OpenSSL's inverse serves there."""
    monkeypatch.setattr(sys, "byteorder", "big")
    assert p256._bind_gmp() is None


@NEEDS_GMP
def test_a_closed_gmp_inverse_answers_none() -> None:
    gmp = p256._libgmp()
    assert gmp is not None
    inverse = p256._GmpInverse(gmp)
    assert inverse(2) == pow(2, -1, N)
    inverse.close()
    inverse.close()  # twice is fine
    assert inverse(2) is None


@NEEDS_GMP
def test_gmp_is_used_where_it_loads() -> None:
    """Where libgmp.so.10 loads (Debian's coreutils needs it), verifiers take s⁻¹ from it."""
    v = _verifier(ec.generate_private_key(ec.SECP256R1()).public_key())
    try:
        assert v._gmp_inverse is not None
    finally:
        v.close()


def test_signatures_of_cryptography_verify(pair: Any) -> None:
    d, key, v = pair
    private = ec.derive_private_key(d, ec.SECP256R1())
    for _ in range(50):
        data = secrets.token_bytes(secrets.randbelow(400))
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
        digest = hashlib.sha256(data).digest()
        assert v.verify(digest, r.to_bytes(32, "big"), s.to_bytes(32, "big")) is True
        other = hashlib.sha256(data + b"x").digest()
        assert v.verify(other, r.to_bytes(32, "big"), s.to_bytes(32, "big")) is False


def test_tampered_signatures_and_digests_are_refused(pair: Any) -> None:
    d, key, v = pair
    e = secrets.randbits(256)
    r, s = _sign(d, e)
    assert _fast(v, e, r, s) is True and _oracle(key, e, r, s)
    for bit in (0, 1, 7, 64, 128, 200, 255):
        for e2, r2, s2 in ((e ^ 1 << bit, r, s), (e, r ^ 1 << bit, s), (e, r, s ^ 1 << bit)):
            if max(r2, s2) >= 2**256:
                continue
            assert _fast(v, e2, r2, s2) is _oracle(key, e2, r2, s2) is False


@pytest.mark.parametrize("bad", [0, N, N + 1, 2**256 - 1])
def test_r_and_s_out_of_range_are_refused(pair: Any, bad: int) -> None:
    d, key, v = pair
    e = secrets.randbits(256)
    r, s = _sign(d, e)
    for r2, s2 in ((bad, s), (r, bad)):
        assert _fast(v, e, r2, s2) is False
        assert _oracle(key, e, r2, s2) is False
    # r + n and s + n are the same values mod n: still out of range, refused
    if r + N < 2**256:
        assert _fast(v, e, r + N, s) is _oracle(key, e, r + N, s) is False
    if s + N < 2**256:
        assert _fast(v, e, r, s + N) is _oracle(key, e, r, s + N) is False


def _sign_with_s(d: int, s: int) -> tuple[int, int]:
    """(e, r) such that (r, s) is a valid signature of e: e = s·k - r·d for a random k."""
    k = secrets.randbelow(N - 1) + 1
    r = _k_times_g(k) % N
    return (s * k - r * d) % N, r


_FEW_LIMBS = [1, 2, 3, 2**64 - 1, 2**64, 2**64 + 1, 2**128, 2**192 - 1, 2**192, N - 1]


@pytest.mark.parametrize("value", _FEW_LIMBS)
def test_s_and_its_inverse_of_any_size(pair: Any, value: int) -> None:
    """s, or s⁻¹, of one to four 64-bit limbs (GMP keeps numbers in limbs, and a number
    that needs fewer than the last one did must not read that one's top limbs), each
    right after a signature whose numbers fill all four."""
    d, key, v = pair
    for s in (value, pow(value, -1, N)):
        e0 = secrets.randbits(256)
        assert _fast(v, e0, *_sign(d, e0)) is True
        e, r = _sign_with_s(d, s)
        assert _fast(v, e, r, s) is _oracle(key, e, r, s) is True
        assert _fast(v, e, r, s + 1 if s + 1 < N else s - 1) is False  # not n - s: valid too


def test_high_s_verifies_as_openssl_does(pair: Any) -> None:
    """ECDSA's (r, n - s) is valid too; JOSE does not forbid it, nor does OpenSSL."""
    d, key, v = pair
    e = secrets.randbits(256)
    r, s = _sign(d, e)
    assert _fast(v, e, r, N - s) is _oracle(key, e, r, N - s) is True


@pytest.mark.parametrize("e", [0, N, N + 5, 2**256 - 1, 1])
def test_digests_of_any_value(pair: Any, e: int) -> None:
    """e = 0 and e = n make u1 = 0 (u1·G at infinity); e >= n is reduced, as OpenSSL does."""
    d, key, v = pair
    r, s = _sign(d, e % N)
    assert _fast(v, e, r, s) is _oracle(key, e, r, s) is True


def test_u1_g_equal_to_u2_q_doubles(pair: Any) -> None:
    """e = r·d makes u1·G = u2·Q: the sum is a doubling, a special case of point addition."""
    d, key, v = pair
    k = secrets.randbelow(N - 1) + 1
    r = _k_times_g(k) % N
    e = r * d % N
    s = pow(k, -1, N) * (e + r * d) % N
    assert _fast(v, e, r, s) is _oracle(key, e, r, s) is True
    assert _fast(v, e, r, s + 1) is _oracle(key, e, r, s + 1) is False
    assert _fast(v, e + 1, r, s) is _oracle(key, e + 1, r, s) is False


def test_r_at_infinity_is_refused(pair: Any) -> None:
    """e = -r·d makes u1·G + u2·Q the point at infinity, whatever s."""
    d, key, v = pair
    r = secrets.randbelow(N - 1) + 1
    e = -r * d % N
    for s in (1, 2, secrets.randbelow(N - 1) + 1):
        assert _fast(v, e, r, s) is _oracle(key, e, r, s) is False


def test_r_at_infinity_is_refused_whatever_x_the_addition_left(pair: Any) -> None:
    """At infinity Z is 0 and X is whatever the addition left there. Were it 0, X = r·Z²
    would hold for any r: Z = 0 alone must refuse (the case above cannot make X 0)."""
    d, key, v = pair
    real = v._lib

    class ZeroXAtInfinity:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def EC_POINT_get_Jprojective_coordinates_GFp(self, *args: Any) -> int:  # noqa: N802
            _, _, x, _, z, _ = args
            assert real.BN_set_word(x, 0) == 1 and real.BN_set_word(z, 0) == 1
            return 1

    e = secrets.randbits(256)
    r, s = _sign(d, e)
    v._lib = ZeroXAtInfinity()
    try:
        assert _fast(v, e, r, s) is False
    finally:
        v._lib = real
    assert _fast(v, e, r, s) is True


# -- affine P-256 arithmetic, for a key made to fit a chosen R -------------------------


def _add(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % P == 0:
        return None
    if a == b:
        lam = (3 * a[0] * a[0] - 3) * pow(2 * a[1], -1, P) % P
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], -1, P) % P
    x = (lam * lam - a[0] - b[0]) % P
    return x, (lam * (a[0] - x) - a[1]) % P


def _mul(k: int, pt: tuple[int, int] | None) -> tuple[int, int] | None:
    out = None
    while k:
        if k & 1:
            out = _add(out, pt)
        pt = _add(pt, pt)
        k >>= 1
    return out


def test_arithmetic_helper_agrees_with_cryptography() -> None:
    k = secrets.randbelow(N - 1) + 1
    assert _mul(k, (GX, GY)) == (lambda n: (n.x, n.y))(
        ec.derive_private_key(k, ec.SECP256R1()).public_key().public_numbers()
    )


def _point_with_x_from(x: int) -> tuple[int, int]:
    """The first point of P-256 whose x is x or more."""
    while True:
        c = (x**3 - 3 * x + B) % P
        y = pow(c, (P + 1) // 4, P)
        if y * y % P == c:
            return x, y
        x += 1


def _key_for(point: tuple[int, int], e: int, r: int, s: int) -> ec.EllipticCurvePublicKey:
    """The key Q for which (e, r, s) makes R = s⁻¹(e·G + r·Q) the chosen point:
    Q = r⁻¹(s·R - e·G)."""
    q = _mul(pow(r, -1, N), _add(_mul(s, point), _mul(N - e % N, (GX, GY))))
    assert q is not None
    return ec.EllipticCurvePublicNumbers(q[0], q[1], ec.SECP256R1()).public_key()


@pytest.mark.parametrize("inverse", ["gmp", "openssl"])
def test_x_of_r_past_the_order(inverse: str) -> None:
    """x(R) in [n, p): r is x - n, and x itself (>= n) is out of range. A key is made
    for a chosen such R."""
    x, y = _point_with_x_from(N + 1)
    r, e, s = x - N, secrets.randbits(256), secrets.randbelow(N - 1) + 1
    key = _key_for((x, y), e, r, s)
    v = _verifier(key) if inverse == "gmp" else _verifier_with_openssl_inverse(key)
    try:
        assert _fast(v, e, r, s) is _oracle(key, e, r, s) is True
        assert _fast(v, e, x, s) is _oracle(key, e, x, s) is False
    finally:
        v.close()


@pytest.mark.parametrize("inverse", ["gmp", "openssl"])
def test_r_whose_r_plus_n_wraps_past_p(inverse: str) -> None:
    """x(R) below p - n, and r = x(R) + (p - n), which is below n: r + n is x(R) + p, so
    X = (r + n)·Z² holds modulo p, yet x(R) mod n is not r. r + n must be below p for
    that comparison to count."""
    x, y = _point_with_x_from(1)
    assert x < P - N
    r, e, s = x + (P - N), secrets.randbits(256), secrets.randbelow(N - 1) + 1
    key = _key_for((x, y), e, r, s)
    v = _verifier(key) if inverse == "gmp" else _verifier_with_openssl_inverse(key)
    try:
        assert _fast(v, e, r, s) is _oracle(key, e, r, s) is False
    finally:
        v.close()


@settings(max_examples=150, deadline=None)
@given(
    e=st.one_of(st.integers(0, 2**256 - 1), st.sampled_from([0, 1, N - 1, N, N + 1])),
    r=st.one_of(st.integers(0, 2**256 - 1), st.sampled_from([0, 1, N - 1, N, 2**256 - 1])),
    s=st.one_of(st.integers(0, 2**256 - 1), st.sampled_from([0, 1, N - 1, N, 2**256 - 1])),
    valid=st.booleans(),
    flip=st.integers(-1, 767),
)
def test_any_input_answers_as_openssl(
    pair: Any, e: int, r: int, s: int, valid: bool, flip: int
) -> None:
    """Random (e, r, s), or a valid signature with one bit of e, r or s flipped (or none)."""
    d, key, v = pair
    if valid:
        r, s = _sign(d, e % N)
        if flip >= 0:
            which, bit = divmod(flip, 256)
            e, r, s = [(val ^ (1 << bit)) if i == which else val for i, val in enumerate((e, r, s))]
    assert _fast(v, e, r, s) is _oracle(key, e, r, s)


def test_wrong_lengths_are_refused(pair: Any) -> None:
    d, key, v = pair
    assert v.verify(b"\x00" * 31, b"\x01" * 32, b"\x01" * 32) is False
    assert v.verify(b"\x00" * 32, b"\x01" * 33, b"\x01" * 32) is False
    assert v.verify(b"\x00" * 32, b"\x01" * 32, b"") is False


@pytest.mark.parametrize(
    "point",
    [
        b"\x04" + (GX).to_bytes(32, "big") + (GY + 1).to_bytes(32, "big"),  # off the curve
        b"\x00",  # the point at infinity
        b"\x04" + b"\xff" * 64,  # coordinates past p
        b"",
    ],
    ids=["off-curve", "infinity", "past-p", "empty"],
)
def test_points_that_are_not_keys_are_refused(pair: Any, point: bytes) -> None:
    with pytest.raises(p256.Unavailable):
        p256.Verifier(point)


def test_a_closed_verifier_answers_none(pair: Any) -> None:
    d, key, _ = pair
    v = _verifier(key)
    e = secrets.randbits(256)
    r, s = _sign(d, e)
    assert _fast(v, e, r, s) is True
    v.close()
    v.close()  # twice is fine
    assert _fast(v, e, r, s) is None


# -- the table of tables -----------------------------------------------------------


def _now(work: Callable[[], None]) -> None:
    work()


def _counting(spawned: list[int]) -> Callable[[Callable[[], None]], None]:
    def spawn(work: Callable[[], None]) -> None:
        spawned.append(1)
        work()

    return spawn


def test_tables_are_built_for_keys_that_verified_and_kept_by_use(pair: Any) -> None:
    """`get` never builds; `learn` (the key verified a signature) does, once; the least
    recently used table goes first, and is freed."""
    spawned: list[int] = []
    tables = p256.Tables(limit=2, spawn=_counting(spawned), min_interval=0)
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(3)]
    assert tables.get(keys[0]) is None and spawned == []  # a key a token names: no build
    tables.learn(keys[0])
    first = tables.get(keys[0])
    assert isinstance(first, p256.Verifier)
    tables.learn(keys[0])
    assert tables.get(keys[0]) is first and len(spawned) == 1
    tables.learn(keys[1])
    assert tables.get(keys[0]) is first  # in use: now the most recent
    tables.learn(keys[2])  # pushes out keys[1]'s, not the busy keys[0]'s
    assert len(tables) == 2 and tables.get(keys[1]) is None
    assert isinstance(tables.get(keys[2]), p256.Verifier)
    assert tables.get(keys[0]) is first  # used last
    tables.learn(keys[1])  # back, and keys[2]'s goes
    assert tables.get(keys[2]) is None and tables.get(keys[0]) is first
    assert first.verify(b"\x00" * 32, b"\x01" * 32, b"\x01" * 32) is not None  # still open


def test_a_pushed_out_table_is_freed(pair: Any) -> None:
    tables = p256.Tables(limit=1, spawn=_now, min_interval=0)
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(2)]
    tables.learn(keys[0])
    first = tables.get(keys[0])
    assert first is not None
    tables.learn(keys[1])
    assert first.verify(b"\x00" * 32, b"\x01" * 32, b"\x01" * 32) is None  # closed


def test_a_key_whose_table_fails_is_not_retried() -> None:
    class NotAKey:
        def public_bytes(self, *args: Any) -> bytes:
            raise ValueError("no")

    spawned: list[int] = []
    tables = p256.Tables(spawn=_counting(spawned), min_interval=0)
    key = NotAKey()
    for _ in range(3):
        tables.learn(key)
        assert tables.get(key) is None
    assert spawned == [1]


def test_no_thread_to_build_in_is_retried_later(caplog: pytest.LogCaptureFixture) -> None:
    """Thread.start() can fail (a container's process limit): the verification goes on
    without a table, and a later one tries again."""
    now = [0.0]
    attempts: list[int] = []

    def spawn(work: Callable[[], None]) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("can't start new thread")
        work()

    tables = p256.Tables(spawn=spawn, clock=lambda: now[0])
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    tables.learn(key)
    assert tables.get(key) is None and len(tables) == 0
    assert "no thread to build a P-256 table in" in caplog.text
    tables.learn(key)  # within the interval: not yet
    assert attempts == [1]
    now[0] += 1.0
    tables.learn(key)
    assert attempts == [1, 1] and isinstance(tables.get(key), p256.Verifier)


def test_builds_start_at_most_once_per_interval() -> None:
    """More keys in use than tables kept: one build a second, not one per token."""
    now = [100.0]
    spawned: list[int] = []
    tables = p256.Tables(limit=1, spawn=_counting(spawned), clock=lambda: now[0])
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(3)]
    for _ in range(50):
        for key in keys:
            tables.learn(key)
    assert spawned == [1]  # the first key's; the others wait for the interval
    assert isinstance(tables.get(keys[0]), p256.Verifier)
    now[0] += 1.0
    tables.learn(keys[1])  # its build starts, and pushes out keys[0]'s
    assert isinstance(tables.get(keys[1]), p256.Verifier) and len(spawned) == 2
    assert tables.get(keys[0]) is None
    tables.learn(keys[2])
    assert tables.get(keys[2]) is None and len(spawned) == 2


def test_the_default_builds_in_a_background_thread(pair: Any) -> None:
    """`learn` does not wait for the table (about 15 ms): a thread builds it."""
    _, key, _ = pair
    tables = p256.Tables()
    before = threading.active_count()
    tables.learn(key)
    deadline = time.monotonic() + 10
    while (v := tables.get(key)) is None:
        assert time.monotonic() < deadline, "the table was not built within 10 s"
        time.sleep(0.01)
    assert isinstance(v, p256.Verifier)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


# -- in jwtcore --------------------------------------------------------------------


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _token(private: ec.EllipticCurvePrivateKey, claims: bytes = b'{"sub":"a"}') -> jwtcore.Jws:
    b64 = _b64
    head = b64(b'{"alg":"ES256"}')
    signing_input = head + b"." + b64(claims)
    r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    token = signing_input + b"." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return jwtcore.parse(token.decode())


@pytest.fixture
def signed(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[ec.EllipticCurvePublicKey, p256.Tables, jwtcore.Jws]:
    """A P-256 key, tables of our own (built at once) in jwtcore's use, a token it signed."""
    private = ec.generate_private_key(ec.SECP256R1())
    tables = p256.Tables(spawn=_now, min_interval=0)
    monkeypatch.setattr(p256, "_TABLES", tables)
    monkeypatch.setattr(p256, "ENABLED", True)
    return private.public_key(), tables, _token(private)


def test_verify_signature_uses_the_table_and_answers_the_same(
    monkeypatch: pytest.MonkeyPatch, signed: Any
) -> None:
    key, tables, good = signed
    forged = good._replace(signature=good.signature[:-1] + bytes([good.signature[-1] ^ 1]))
    for _ in range(3):  # a key that only ever meets forgeries gets no table
        with pytest.raises(jwtcore.TokenError, match="does not verify"):
            jwtcore.verify_signature(forged, "ES256", key)
    assert tables.get(key) is None and len(tables) == 0
    jwtcore.verify_signature(good, "ES256", key)  # verified: the table is built
    v = tables.get(key)
    assert v is not None
    calls: list[bool | None] = []
    real = p256.Verifier.verify

    def counting(self: p256.Verifier, *args: bytes) -> bool | None:
        calls.append(real(self, *args))
        return calls[-1]

    monkeypatch.setattr(p256.Verifier, "verify", counting)
    jwtcore.verify_signature(good, "ES256", key)
    with pytest.raises(jwtcore.TokenError, match="does not verify"):
        jwtcore.verify_signature(forged, "ES256", key)
    assert calls == [True, False]
    # off (MESHCA_P256_TABLES=0), or a verifier that cannot answer: cryptography decides
    for patch in ("off", "none"):
        calls.clear()
        if patch == "off":
            monkeypatch.setattr(p256, "ENABLED", False)
        else:
            monkeypatch.setattr(p256, "ENABLED", True)
            monkeypatch.setattr(p256.Verifier, "verify", lambda self, *a: calls.append(None))
        jwtcore.verify_signature(good, "ES256", key)
        with pytest.raises(jwtcore.TokenError, match="does not verify"):
            jwtcore.verify_signature(forged, "ES256", key)
        assert calls == ([] if patch == "off" else [None, None])


def test_hooks_run_after_each_table_built_and_never_lose_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The sidecar gives memory back after a build (`after_build`); a failing hook is
    logged and the table kept; a key whose table fails calls no hook; unhooked, no call."""
    monkeypatch.setattr(p256, "_AFTER_BUILD", [])
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("the loop is closed")

    unhook = p256.after_build(lambda: ran.append("settle"))
    p256.after_build(broken)
    tables = p256.Tables(spawn=_now, min_interval=0)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    tables.learn(key)
    assert tables.get(key) is not None
    assert ran == ["settle"]
    assert "after a P-256 table was built" in caplog.text
    tables.learn(ec.generate_private_key(ec.SECP384R1()).public_key())  # not P-256: no table
    assert ran == ["settle"]
    unhook()
    unhook()  # twice is fine
    tables.learn(ec.generate_private_key(ec.SECP256R1()).public_key())
    assert ran == ["settle"]


def test_a_key_with_a_table_still_meets_every_check(signed: Any) -> None:
    """With a table built for one P-256 key, ES256 with any other kind of key, a signature
    of another length, or a header naming another algorithm are refused as before."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key, tables, good = signed
    jwtcore.verify_signature(good, "ES256", key)
    assert tables.get(key) is not None
    others = [
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
        b"a shared secret of more than enough bytes",
    ]
    for other in others:
        with pytest.raises(jwtcore.TokenError, match="does not match"):
            jwtcore.verify_signature(good, "ES256", other)
    for sig in (
        b"",
        good.signature[:31],
        good.signature[:63],
        good.signature + b"\x00",
        good.signature * 2,
        b"\x00" * 64,
    ):
        with pytest.raises(jwtcore.TokenError, match="does not verify"):
            jwtcore.verify_signature(good._replace(signature=sig), "ES256", key)
    with pytest.raises(jwtcore.TokenError, match="not accepted"):
        jwtcore.verify_signature(good, "ES384", key)  # the header says ES256
    jwtcore.verify_signature(good, "ES256", key)  # and the table still answers
