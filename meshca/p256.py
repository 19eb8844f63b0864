"""ES256 signatures verified with a table precomputed for the signing key: a new token
costs less than half of what `cryptography` spends on it.

ECDSA verification computes R = u1·G + u2·Q (G the curve's generator, Q the public key)
and compares R's x with r. OpenSSL has a precomputed table for G, so u1·G is cheap; u2·Q
is a variable-base multiplication, about three quarters of the work. A JWT verifier
meets the same few issuer keys for every token, so here each key gets a table of its
own, and both products come from tables.

The curve arithmetic stays OpenSSL's. The system's libcrypto (the one Python's `ssl`
module has loaded already) is called through ctypes: a P-256 group whose generator is
set to Q gets OpenSSL's own precomputation (`EC_GROUP_precompute_mult`, 150 KiB and
about 15 ms per key, built in a background thread), and `EC_POINT_mul` on it uses that
table. A key gets one once it has verified a signature through `cryptography` (never a
key a token merely names). The verification equation of ECDSA (SEC 1 4.1.4;
FIPS 186-5 6.4.2) is written here: the range of r and s, w = s⁻¹, u1 = e·w and
u2 = r·w mod n, R not at infinity, x(R) mod n = r, the steps OpenSSL's own
`ossl_ecdsa_simple_verify_sig` takes, two of them cheaper than there: w comes from
GMP's `mpz_invert` (the system's libgmp, through ctypes; OpenSSL's `BN_mod_inverse`
where there is none), and x(R) is compared in R's Jacobian coordinates (X = x·Z²),
without the inversion modulo p that its affine x costs. tests/meshca/test_p256.py
checks each step against `cryptography`'s verification, with the cases that trip
implementations (u1 = 0, u1·G = u2·Q, R at infinity, x(R) of n or more, r + n past p).

Where the calls are not there (no libcrypto 3 loaded, a build without them) or
`MESHCA_P256_TABLES=0` is set, `verify_es256` answers None and the caller verifies with
`cryptography` as before. Nothing secret goes through here: signatures, digests and
public keys only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import sys
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

# The order of P-256's group (FIPS 186-5, SP 800-186 3.2.1.3).
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# The prime of its field (the same documents, 3.2.1.3).
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_NID_P256 = 415  # NID_X9_62_prime256v1
ENV = "MESHCA_P256_TABLES"
log = logging.getLogger(__name__)
MAX_KEYS = 8  # tables kept (150 KiB each); a JWKS names a few keys at a time


class Unavailable(Exception):
    """The system's libcrypto cannot do this here (not loaded, too old, a call failed)."""


_lib: Any = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _find_libcrypto() -> str:
    """The path of the libcrypto this process has loaded (Python's `ssl` links it)."""
    import ssl  # noqa: F401, PLC0415 (loads libcrypto if nothing has yet)

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and "/libcrypto.so" in "/" + path:
                    return "/" + path
    except OSError:
        pass
    return "libcrypto.so.3"


def _bind() -> Any:
    """The libcrypto functions used here, with their C signatures; Unavailable if any is
    missing or the library is older than OpenSSL 3."""
    import ctypes  # noqa: PLC0415 (only where a P-256 key is used)

    try:
        lib = ctypes.CDLL(_find_libcrypto())
    except OSError as e:
        raise Unavailable(f"no libcrypto: {e}") from None
    p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "OpenSSL_version_num": (ctypes.c_ulong, []),
        "ERR_clear_error": (None, []),
        "BN_CTX_new": (p, []),
        "BN_CTX_free": (None, [p]),
        "BN_new": (p, []),
        "BN_free": (None, [p]),
        "BN_set_word": (i, [p, ctypes.c_ulong]),
        "BN_bin2bn": (p, [ctypes.c_char_p, i, p]),
        "BN_bn2binpad": (i, [p, ctypes.c_char_p, i]),
        "BN_mod_inverse": (p, [p, p, p, p]),
        "EC_GROUP_new_by_curve_name": (p, [i]),
        "EC_GROUP_free": (None, [p]),
        "EC_GROUP_get0_order": (p, [p]),
        "EC_GROUP_set_generator": (i, [p, p, p, p]),
        "EC_GROUP_precompute_mult": (i, [p, p]),
        "EC_POINT_new": (p, [p]),
        "EC_POINT_free": (None, [p]),
        "EC_POINT_oct2point": (i, [p, p, ctypes.c_char_p, sz, p]),
        "EC_POINT_mul": (i, [p, p, p, p, p, p]),
        "EC_POINT_add": (i, [p, p, p, p, p]),
        "EC_POINT_is_at_infinity": (i, [p, p]),
        "EC_POINT_get_Jprojective_coordinates_GFp": (i, [p, p, p, p, p, p]),
    }
    for name, (restype, argtypes) in signatures.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise Unavailable(f"libcrypto has no {name}") from None
        fn.restype, fn.argtypes = restype, argtypes
    if lib.OpenSSL_version_num() < 0x30000000:
        raise Unavailable("libcrypto is older than OpenSSL 3")
    return lib


def _libcrypto() -> Any:
    """The bound libcrypto, once per process; Unavailable (the same reason each time)."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _bind()
            except Unavailable as e:
                _lib_error = str(e)
        if _lib is None:
            raise Unavailable(_lib_error)
        return _lib


_gmp: Any = None
_gmp_tried = False


def _bind_gmp() -> Any:
    """GMP (libgmp.so.10, which Debian's coreutils needs, so nearly every Debian-based
    image has it), for s⁻¹ mod n: its `mpz_invert` costs about 2.4 µs with the calls,
    against 8.4 for OpenSSL's `BN_mod_inverse`. None where it is not there, or its limbs
    are not 64-bit little-endian words (numbers are written into them and read from them
    as little-endian bytes here); OpenSSL's inverse then serves.

    GMP frees the inverse's limbs with its memory functions of the time: another library
    in this process that set its own (`mp_set_memory_functions`) on this libgmp after
    GMP's first use would break GMP's own rule; none of the sidecar's does."""
    import ctypes  # noqa: PLC0415

    if sys.byteorder != "little":
        return None
    try:
        lib = ctypes.CDLL("libgmp.so.10")
        if ctypes.c_int.in_dll(lib, "__gmp_bits_per_limb").value != 64:
            return None
        p = ctypes.c_void_p
        # mpz_init2, mpz_clear and mpz_invert are macros of gmp.h for these
        init2, clear, invert = lib.__gmpz_init2, lib.__gmpz_clear, lib.__gmpz_invert
    except (OSError, AttributeError, ValueError):
        return None
    init2.restype, init2.argtypes = None, [p, ctypes.c_ulong]
    clear.restype, clear.argtypes = None, [p]
    invert.restype, invert.argtypes = ctypes.c_int, [p, p, p]
    return types.SimpleNamespace(init2=init2, clear=clear, invert=invert)


def _libgmp() -> Any:
    """The bound GMP, once per process, or None."""
    global _gmp, _gmp_tried
    with _lib_lock:
        if not _gmp_tried:
            _gmp, _gmp_tried = _bind_gmp(), True
        return _gmp


@functools.cache
def _mpz_type() -> Any:
    """gmp.h's `__mpz_struct`: the limbs allocated, the limbs used (the sign is its sign),
    and the limbs, least significant first. One class for every verifier."""
    import ctypes  # noqa: PLC0415

    class Mpz(ctypes.Structure):
        _fields_ = [("alloc", ctypes.c_int), ("size", ctypes.c_int), ("d", ctypes.c_void_p)]

    return Mpz


class _GmpInverse:
    """s⁻¹ mod n with GMP, for one verifier (under its lock: the numbers are scratch).

    s is written straight into the limbs GMP allocated for it (room for 5, s has at most
    4), n once; the inverse is read from the limbs GMP gives it. GMP's `mpz_invert`
    writes its result through `mpz_add`, `mpz_sub` or `mpz_set`, which need at most 5
    limbs here: it never reallocates s or n (inputs), and w's limbs are looked up on each
    call."""

    def __init__(self, gmp: Any) -> None:
        import ctypes  # noqa: PLC0415

        self._gmp = gmp
        self._addressof, self._string_at = ctypes.addressof, ctypes.string_at
        mpz = _mpz_type()
        self._s, self._w, self._n = mpz(), mpz(), mpz()
        self._live: list[Any] = []  # initialized, to clear
        for z in (self._s, self._w, self._n):
            gmp.init2(ctypes.addressof(z), 320)
            self._live.append(z)
        self._s_limbs = memoryview((ctypes.c_char * 32).from_address(self._s.d)).cast("B")
        self._put(self._n, N, memoryview((ctypes.c_char * 32).from_address(self._n.d)).cast("B"))
        self._args = tuple(ctypes.addressof(z) for z in (self._w, self._s, self._n))

    @staticmethod
    def _put(z: Any, value: int, limbs: memoryview) -> None:
        limbs[:] = value.to_bytes(32, "little")
        z.size = (value.bit_length() + 63) >> 6  # normalized: no zero limb on top

    def __call__(self, s: int) -> int | None:
        """s⁻¹ mod n for s in [1, n-1]; None once closed, or if GMP finds none (n is
        prime: never)."""
        if len(self._live) != 3:
            return None
        self._put(self._s, s, self._s_limbs)
        if not self._gmp.invert(*self._args):
            return None
        w = self._w
        return int.from_bytes(self._string_at(w.d, w.size * 8), "little")

    def close(self) -> None:
        """Give GMP back its limbs (once; the numbers are never used after)."""
        while self._live:
            self._gmp.clear(self._addressof(self._live.pop()))


# Tables are in use unless MESHCA_P256_TABLES=0 (read once, at import).
ENABLED = os.environ.get(ENV, "1") != "0"


class Verifier:
    """ES256 verification for one P-256 public key, with a precomputed table of the key.

    Building it costs about 15 ms of CPU (the table: 37 rows of 64 points); ctypes lets
    go of the GIL meanwhile, so a background thread can build it. `verify` is safe from
    any thread (one lock: OpenSSL's scratch space here is not shared)."""

    def __init__(self, point: bytes) -> None:
        """`point`: the key, X9.62 uncompressed (65 bytes). Unavailable if the library is
        not usable here or refuses the point (not on the curve)."""
        lib = _libcrypto()
        self._lib = lib
        self._lock = threading.Lock()
        self._ctx = self._g = self._q_group = None
        self._gmp_inverse: _GmpInverse | None = None
        self._bns: list[Any] = []
        self._points: list[Any] = []
        try:
            self._build(lib, point)
        except BaseException:
            lib.ERR_clear_error()  # this thread's OpenSSL errors: not left for `ssl` to read
            self.close()
            raise

    def _build(self, lib: Any, point: bytes) -> None:
        self._ctx = _checked(lib.BN_CTX_new(), "BN_CTX_new")
        self._g = _checked(lib.EC_GROUP_new_by_curve_name(_NID_P256), "EC_GROUP_new")
        self._q_group = _checked(lib.EC_GROUP_new_by_curve_name(_NID_P256), "EC_GROUP_new")
        order = lib.EC_GROUP_get0_order(self._g)  # the group's own BIGNUM: not freed here
        q = _checked(lib.EC_POINT_new(self._q_group), "EC_POINT_new")
        one = _checked(lib.BN_new(), "BN_new")
        try:
            if lib.EC_POINT_oct2point(self._q_group, q, point, len(point), self._ctx) != 1:
                raise Unavailable("the key is not a point of P-256")
            if lib.EC_POINT_is_at_infinity(self._q_group, q):
                raise Unavailable("the key is the point at infinity")
            if lib.BN_set_word(one, 1) != 1 or (
                lib.EC_GROUP_set_generator(self._q_group, q, order, one) != 1
            ):
                raise Unavailable("EC_GROUP_set_generator failed")
        finally:
            lib.EC_POINT_free(q)
            lib.BN_free(one)
        if lib.EC_GROUP_precompute_mult(self._q_group, self._ctx) != 1:
            raise Unavailable("EC_GROUP_precompute_mult failed")
        for _ in range(4):  # u1, u2, and R's X and Z
            self._bns.append(_checked(lib.BN_new(), "BN_new"))
        for _ in range(2):
            self._points.append(_checked(lib.EC_POINT_new(self._g), "EC_POINT_new"))
        import ctypes  # noqa: PLC0415 (loaded by _bind already)

        self._x_out = ctypes.create_string_buffer(32)
        self._z_out = ctypes.create_string_buffer(32)
        self._order = order
        gmp = _libgmp()
        self._gmp_inverse = _GmpInverse(gmp) if gmp is not None else None

    def _bn_inverse(self, s: bytes) -> int | None:
        """s⁻¹ mod n with OpenSSL, where GMP is not there (under the lock)."""
        lib, bs, bw = self._lib, self._bns[0], self._bns[1]  # u1's and u2's, free still
        if not (
            lib.BN_bin2bn(s, 32, bs)
            and lib.BN_mod_inverse(bw, bs, self._order, self._ctx)
            and lib.BN_bn2binpad(bw, self._x_out, 32) == 32
        ):
            return None
        return int.from_bytes(self._x_out.raw, "big")

    def verify(self, digest: bytes, r: bytes, s: bytes) -> bool | None:
        """Does (r, s) (32 bytes each, big-endian) sign the SHA-256 `digest` for this key?
        None if it could not be computed (closed, or OpenSSL failed): the caller then
        verifies another way. Never True for a signature OpenSSL's ECDSA would refuse."""
        if len(digest) != 32 or len(r) != 32 or len(s) != 32:
            return False
        r_int, s_int = int.from_bytes(r, "big"), int.from_bytes(s, "big")
        if not 0 < r_int < N or not 0 < s_int < N:
            return False  # SEC 1 4.1.4 step 1
        lib = self._lib
        with self._lock:
            if self._ctx is None:
                return None
            # step 4: w = s⁻¹, u1 = e·w, u2 = r·w mod n (n is prime, so s has an inverse;
            # e is the whole digest, as n has 256 bits)
            gmp_inverse = self._gmp_inverse
            w = gmp_inverse(s_int) if gmp_inverse is not None else self._bn_inverse(s)
            if w is None:
                lib.ERR_clear_error()
                return None
            u1 = (int.from_bytes(digest, "big") * w % N).to_bytes(32, "big")
            u2 = (r_int * w % N).to_bytes(32, "big")
            ctx, g, qg, b1, b2, bx, bz = self._ctx, self._g, self._q_group, *self._bns
            r1, r2 = self._points
            ok = (
                lib.BN_bin2bn(u1, 32, b1)
                and lib.BN_bin2bn(u2, 32, b2)
                and lib.EC_POINT_mul(g, r1, b1, None, None, ctx) == 1  # u1·G (G's table)
                and lib.EC_POINT_mul(qg, r2, b2, None, None, ctx) == 1  # u2·Q (Q's table)
                and lib.EC_POINT_add(g, r1, r1, r2, ctx) == 1  # R
                # R's Jacobian X and Z (x = X/Z²): no inversion modulo p to compare
                and lib.EC_POINT_get_Jprojective_coordinates_GFp(g, r1, bx, None, bz, ctx) == 1
                and lib.BN_bn2binpad(bx, self._x_out, 32) == 32
                and lib.BN_bn2binpad(bz, self._z_out, 32) == 32
            )
            if not ok:
                lib.ERR_clear_error()
                return None
            x, z = int.from_bytes(self._x_out.raw, "big"), int.from_bytes(self._z_out.raw, "big")
        if z == 0:
            return False  # step 5: R at infinity
        # steps 6-8: x(R) mod n = r. x(R) < p < 2n, so x(R) is r, or r + n where that is
        # below p; x(R) = v exactly when X = v·Z² mod p.
        zz = z * z % P
        if (x - r_int * zz) % P == 0:
            return True
        return r_int + N < P and (x - (r_int + N) * zz) % P == 0

    def close(self, *, wait: bool = True) -> None:
        """Free what OpenSSL holds for this key (the table); `verify` then answers None.
        Without `wait`, only if no verification holds it now (else the OS frees it)."""
        lib = getattr(self, "_lib", None)
        if lib is None or not self._lock.acquire(blocking=wait):
            return
        try:
            gmp_inverse, self._gmp_inverse = self._gmp_inverse, None
            if gmp_inverse is not None:
                gmp_inverse.close()
            for bn in self._bns:
                lib.BN_free(bn)
            for pt in self._points:
                lib.EC_POINT_free(pt)
            self._bns, self._points = [], []
            for group in (self._q_group, self._g):
                if group is not None:
                    lib.EC_GROUP_free(group)
            if self._ctx is not None:
                lib.BN_CTX_free(self._ctx)
            self._ctx = self._g = self._q_group = None
        finally:
            self._lock.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at exit ctypes may be gone; the OS frees it
            self.close(wait=False)


def _checked(value: Any, what: str) -> Any:
    if not value:
        raise Unavailable(f"{what} failed")
    return value


def _start_thread(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="meshca-p256-table", daemon=True).start()


class Tables:
    """Verifiers by key object, at most `limit` (the least recently used closed first).

    `get` only looks up. `learn` is for a key that has just verified a signature the
    other way: it starts building the key's table (with `spawn`: a background thread),
    so only keys the issuer signs with get one, never a key a token merely names. A key
    whose table cannot be built is remembered as such (None from then on): the caller's
    own verification serves it. At most one build starts per `min_interval` seconds, so
    more keys in use than `limit` (tables built, pushed out, built again) cost at most
    15 ms of CPU a second, not a build per token."""

    def __init__(
        self,
        limit: int = MAX_KEYS,
        spawn: Callable[[Callable[[], None]], None] = _start_thread,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.spawn = spawn
        self.min_interval = min_interval
        self.clock = clock
        self._last_build = -math.inf
        self._lock = threading.Lock()
        # id(key) -> (key, Verifier | None while building or after a failure); the key is
        # held so that its id is not reused while the entry lives.
        self._entries: OrderedDict[int, tuple[Any, Verifier | None]] = OrderedDict()

    def get(self, key: Any) -> Verifier | None:
        """The verifier of `key` (a cryptography P-256 public key) if its table is built."""
        entry = self._entries.get(id(key))
        if entry is None or entry[0] is not key:
            return None
        if entry[1] is not None:
            with contextlib.suppress(KeyError):  # pushed out meanwhile by another thread
                self._entries.move_to_end(id(key))
        return entry[1]

    def learn(self, key: Any) -> None:
        """`key` verified a signature: build its table, unless it has one (or is being
        given one, or could not be) or a build started less than `min_interval` ago."""
        entry = self._entries.get(id(key))
        if entry is not None and entry[0] is key:
            return
        with self._lock:
            entry = self._entries.get(id(key))
            if entry is not None and entry[0] is key:
                return
            now = self.clock()
            if now - self._last_build < self.min_interval:
                return  # a later verification asks again
            self._last_build = now
            self._entries[id(key)] = (key, None)
            self._evict()
        try:
            self.spawn(lambda: self._build(key))
        except Exception:  # no thread (a process limit): verify the other way, retry later
            log.warning("no thread to build a P-256 table in", exc_info=True)
            with self._lock:
                entry = self._entries.get(id(key))
                if entry is not None and entry[0] is key:
                    del self._entries[id(key)]

    def _build(self, key: Any) -> None:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        try:
            point = key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            verifier: Verifier | None = Verifier(point)
        except (Unavailable, ValueError, TypeError):
            verifier = None
        with self._lock:
            entry = self._entries.get(id(key))
            # kept only in the entry it was built for, and only once (a key pushed out
            # and learnt again while this build ran has a build of its own)
            kept = entry is not None and entry[0] is key and entry[1] is None
            if kept:
                self._entries[id(key)] = (key, verifier)
        if not kept:
            if verifier is not None:
                verifier.close()
            return
        if verifier is not None:
            log.debug("a P-256 table is built (%d kept)", len(self._entries))
            for hook in list(_AFTER_BUILD):
                try:
                    hook()
                except Exception:  # a hook's failure never loses the table
                    log.exception("after a P-256 table was built")

    def _evict(self) -> None:
        while len(self._entries) > self.limit:
            _, (_, old) = self._entries.popitem(last=False)
            if old is not None:
                old.close()

    def __len__(self) -> int:
        return len(self._entries)


_TABLES = Tables()
_AFTER_BUILD: list[Callable[[], None]] = []


def after_build(hook: Callable[[], None]) -> Callable[[], None]:
    """Call `hook` after each table is built, from the thread that built it (the sidecar
    gives back then the pages the build and the verifications before it touched); what
    this returns stops that."""
    _AFTER_BUILD.append(hook)
    return lambda: _AFTER_BUILD.remove(hook) if hook in _AFTER_BUILD else None


def verify_es256(key: Any, signing_input: bytes, r: bytes, s: bytes) -> bool | None:
    """True or False from `key`'s table; None when there is none (yet, or here): the
    caller verifies with `cryptography`, and then calls `verified_with`."""
    if not ENABLED:
        return None
    verifier = _TABLES.get(key)
    if verifier is None:
        return None
    return verifier.verify(hashlib.sha256(signing_input).digest(), r, s)


def prepare() -> bool:
    """Bind the system's libcrypto (and libgmp, if there) now, from the thread that calls
    this (the sidecar's event loop at start-up), so that no build thread loads a library
    later; is libcrypto usable?"""
    _libgmp()
    try:
        _libcrypto()
    except Unavailable:
        return False
    return True


def verified_with(key: Any) -> None:
    """`key` (P-256) has verified an ES256 signature without a table: give it one."""
    if ENABLED:
        _TABLES.learn(key)
