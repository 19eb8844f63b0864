"""CPU per JWT on the sidecar's inbound path: a new token each time (the cold path) against
one bare ES256 verification, pyjwt's `decode`, and a cached token.

The cold path verifies ES256 from a table of the key (meshca.p256) once the table is
built (this bench waits for it); "table alone" is that verification by itself, and the
cold path with the tables off (`MESHCA_P256_TABLES=0`) is measured too.

The cold path is what a request with a token the sidecar has not seen costs: find the
token in the headers, parse it, pick the issuer and key, verify, check the claims, build
the identity, insert it in the cache. Each of the N tokens is distinct (its own `jti`,
as JWT-SVIDs and SA tokens are), so the cache never hits; a fresh Authenticator per
batch. The bare verification is the floor: `cryptography`'s ECDSA P-256 / SHA-256 of
the JOSE r||s signature converted to DER. Each round runs every case, in turn, over the
same short batch of tokens; the figures are CPU time (process_time) per token, median
and quietest tenth over rounds, and the median of the per-round ratios to the bare
verification, which is what to compare on a machine others are using too.

    .venv/bin/python bench/bench_jwt_verify.py [--tokens N] [--rounds R] [--batch B] [--profile]
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import hashlib
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meshca import p256
from meshca.jwks import FileJwks
from sidecar.policy.authn import Authenticator, IssuerRule

ISS = "https://ca.test"
AUD = "backend"


class Setup:
    """One EC key in a JWKS file, and N distinct ES256 tokens shaped like JWT-SVIDs."""

    def __init__(self, n: int) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public = self.key.public_key()
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.public))
        self.dir = Path(tempfile.mkdtemp(prefix="bench-jwt-"))
        (self.dir / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
        self.jwks = FileJwks(self.dir / "jwks.json")
        now = int(time.time())
        self.tokens = [
            jwt.encode(
                {
                    "iss": ISS,
                    "aud": [AUD],
                    "sub": "spiffe://cluster.local/ns/default/sa/client",
                    "exp": now + 3600,
                    "iat": now,
                    "jti": f"{i:032x}",
                },
                self.key,
                algorithm="ES256",
                headers={"kid": "k1", "typ": "JWT"},
            )
            for i in range(n)
        ]
        self.heads = [
            [(b"host", b"backend"), (b"authorization", b"Bearer " + t.encode())]
            for t in self.tokens
        ]

    def authenticator(self, cls: type[Authenticator] = Authenticator) -> Authenticator:
        return cls([IssuerRule(ISS, (AUD,), self.jwks)])


ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def bare_verify(public: ec.EllipticCurvePublicKey, token: str) -> None:
    """One ES256 verification and nothing else: r||s from base64url to DER, then OpenSSL."""
    signing_input, _, sig = token.rpartition(".")
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, signing_input.encode(), ECDSA_SHA256)


def wait_for_table(key: ec.EllipticCurvePublicKey) -> p256.Verifier | None:
    """The key's table as the sidecar builds it (a background thread); None where the
    system's libcrypto cannot build one (said on stderr)."""
    try:  # is it possible here at all? (a table of its own, freed at once)
        p256.Verifier(
            key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        ).close()
    except p256.Unavailable as e:
        print(f"(no P-256 tables here: {e})", file=sys.stderr)
        return None
    deadline = time.monotonic() + 10
    while (table := p256._TABLES.get(key)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return table


def table_verify(table: p256.Verifier, token: str) -> None:
    """One ES256 verification from the key's table: r||s from base64url, the digest."""
    signing_input, _, sig = token.rpartition(".")
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    if not table.verify(hashlib.sha256(signing_input.encode()).digest(), raw[:32], raw[32:]):
        raise SystemExit("a token did not verify from the table")


def per_item(fn: Callable[[Any], object], items: Sequence[Any]) -> float:
    """CPU microseconds per call of fn over items."""
    t0 = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - t0) / len(items) * 1e6


Case = Callable[[Sequence[str], Sequence[list[tuple[bytes, bytes]]]], float]


def cases(s: Setup, cls: type[Authenticator] = Authenticator, tag: str = "") -> dict[str, Case]:
    """name -> a function of a batch (tokens, the same as request headers): CPU µs per token."""

    def cold(_tokens: Sequence[str], heads: Sequence[list[tuple[bytes, bytes]]]) -> float:
        a = s.authenticator(cls)  # empty cache: every token is new to it
        return per_item(lambda h: a.verify(a.find_token(h)), heads)

    warm = s.authenticator(cls)
    for h in s.heads:
        warm.verify(warm.find_token(h))

    def cold_without_tables(
        tokens: Sequence[str], heads: Sequence[list[tuple[bytes, bytes]]]
    ) -> float:
        p256.ENABLED = False
        try:
            return cold(tokens, heads)
        finally:
            p256.ENABLED = True

    pyjwt_key = s.jwks.get("k1").key  # type: ignore[union-attr]
    table = wait_for_table(pyjwt_key)
    extra: dict[str, Case] = {}
    if table is not None:
        extra = {
            "ES256 from the key's table alone": lambda tokens, _h: per_item(
                lambda t: table_verify(table, t), tokens
            ),
            f"cold, tables off{tag}": cold_without_tables,
        }
    return {
        "bare ES256 verify (cryptography)": lambda tokens, _h: per_item(
            lambda t: bare_verify(s.public, t), tokens
        ),
        **extra,
        "pyjwt.decode ES256": lambda tokens, _h: per_item(
            lambda t: jwt.decode(t, pyjwt_key, algorithms=["ES256"], audience=AUD, issuer=ISS),
            tokens,
        ),
        f"cold: find_token + verify{tag}": cold,
        f"cached hit: find_token + verify{tag}": lambda _t, heads: per_item(
            lambda h: warm.verify(warm.find_token(h)), heads
        ),
        f"find_token alone{tag}": lambda _t, heads: per_item(warm.find_token, heads),
    }


def run(s: Setup, table: dict[str, Case], rounds: int, batch: int) -> dict[str, list[float]]:
    """Each round, every case over the same batch of distinct tokens, in turn."""
    got: dict[str, list[float]] = {name: [] for name in table}
    for r in range(rounds):
        i = r * batch % max(1, len(s.tokens) - batch)
        tokens, heads = s.tokens[i : i + batch], s.heads[i : i + batch]
        for name, fn in table.items():
            got[name].append(fn(tokens, heads))
    return got


def report(got: dict[str, list[float]], floor: str = "bare ES256 verify (cryptography)") -> None:
    """Median and quietest tenth (p10) per case; the median of the per-round ratios to
    the floor (the same tokens, moments apart)."""
    base = got[floor]
    print(f"{'CPU µs per token':44s} {'median':>8s} {'p10':>8s} {'x bare':>7s}")
    for name, values in got.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        p10 = statistics.quantiles(values, n=10)[0]
        print(f"{name:44s} {statistics.median(values):8.1f} {p10:8.1f} {ratio:7.2f}")


def profile(s: Setup) -> None:
    a = s.authenticator()
    prof = cProfile.Profile()
    prof.enable()
    for h in s.heads:
        a.verify(a.find_token(h))
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50, help="tokens per case per round")
    ap.add_argument("--profile", action="store_true", help="cProfile the cold path instead")
    args = ap.parse_args()
    s = Setup(args.tokens)
    if args.profile:
        profile(s)
        return
    report(run(s, cases(s), args.rounds, args.batch))


if __name__ == "__main__":
    main()
