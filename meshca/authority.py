"""The CA's signing material: creating a new CA in a home directory and loading the active one.

`Authority` holds the trusted roots, the issuing intermediate and its key, and
signs leaves. It is immutable: a change of state (rotation, later) builds a new
Authority and swaps it in whole.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from meshca import pki, store
from meshca.errors import StateError
from meshca.store import load_ec_key

__all__ = ["Authority", "ca_name", "ensure_jwt_key", "init_ca", "load_ec_key"]
from meshca.spiffe import InvalidSpiffeId, SpiffeId, validate_trust_domain


def ca_name(kind: str, cert: x509.Certificate) -> str:
    """The base name a CA certificate is stored under: `<kind>-<first 8 hex of its SKI>`."""
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return f"{kind}-{ski.digest.hex()[:8]}"


@dataclass(frozen=True)
class Authority:
    """The loaded CA: bundle roots, the issuing intermediate and (hidden from repr) its key."""

    source: store.StateStore = field(repr=False)
    state: store.State
    roots: tuple[x509.Certificate, ...]
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey = field(repr=False)
    endorsements: tuple[x509.Certificate, ...] = ()

    @property
    def trust_domain(self) -> str:
        """The trust domain every issued SPIFFE ID must be in."""
        return self.state.trust_domain

    @classmethod
    def load(cls, where: Path | store.StateStore) -> Authority:
        """Read the state record and the material it names (from a state directory or a
        store); StateError naming what is missing or bad."""
        sd = store.open_state(where)
        state = sd.read_state()
        roots = tuple(sd.cert(name) for name in state.roots)
        intermediate = sd.cert(state.intermediate)
        key = sd.key(state.intermediate)
        if key.public_key() != intermediate.public_key():
            raise StateError(f"{state.intermediate}.key does not match {state.intermediate}.crt")
        issuing_root = roots[state.roots.index(state.issuing_root)]
        try:
            intermediate.verify_directly_issued_by(issuing_root)
        except (InvalidSignature, ValueError, TypeError) as e:
            raise StateError(
                f"{state.intermediate}.crt is not signed by {state.issuing_root}.crt "
                f"({type(e).__name__})"
            ) from None
        endorsements = tuple(sd.cert(name) for name in state.endorsements)
        return cls(sd, state, roots, intermediate, key, endorsements)

    def issue(
        self,
        public_key: pki.LeafPublicKey,
        spiffe_id: SpiffeId,
        now: dt.datetime,
        ttl: dt.timedelta,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> x509.Certificate:
        """Sign an X.509-SVID for an ID in this trust domain."""
        if spiffe_id.trust_domain != self.trust_domain:
            raise ValueError(f"{spiffe_id} is not in trust domain {self.trust_domain}")
        return pki.build_leaf(
            public_key,
            spiffe_id,
            self.intermediate,
            self.intermediate_key,
            now,
            ttl,
            dns_names,
            ip_addresses,
        )

    def chain_pem(self, leaf: x509.Certificate) -> str:
        """Leaf then intermediate, PEM: what a workload presents in TLS."""
        return pki.pem_join([leaf, self.intermediate])

    def bundle_pem(self) -> str:
        """The trust bundle: every trusted root, PEM."""
        return pki.pem_join(self.roots)

    def endorsements_pem(self, now: dt.datetime) -> str:
        """Cross-certificates that lead from earlier roots to the current ones, PEM."""
        return pki.pem_join(e for e in self.endorsements if e.not_valid_after_utc > now)


def init_ca(
    where: Path | store.StateStore,
    trust_domain: str = "cluster.local",
    clock: store.Clock = store.utcnow,
) -> store.State:
    """Create a new CA in a state directory or store: root (10 y), intermediate (1 y,
    pathlen 0), token and JWT signing keys, ledger.

    Refuses (StateError, nothing changed) when it already holds a CA (or, for a directory,
    other files). Safe against a concurrent init (lock) and a crash (the state record is
    written last).
    """
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as e:
        raise StateError(f"--trust-domain: {e}") from None
    sd = store.open_state(where)
    with sd.initializing():
        now = clock()
        root_key = pki.new_key()
        root = pki.build_root(root_key, now)
        int_key = pki.new_key()
        intermediate = pki.build_intermediate(int_key, root, root_key, now)
        root_name, int_name = ca_name("root", root), ca_name("issuing", intermediate)
        try:
            sd.write_pair(root_name, pki.key_pem(root_key), pki.cert_pem(root))
            sd.write_pair(int_name, pki.key_pem(int_key), pki.cert_pem(intermediate))
            sd.write_key(store.TOKEN_KEY_FILE, pki.key_pem(pki.new_key()))
            sd.write_key(store.JWT_KEY_FILE, pki.key_pem(pki.new_key()))
            ledger = sd.ledger(clock)
            try:
                ledger.record_event(
                    "init",
                    {
                        "trust_domain": trust_domain,
                        "root": pki.serial_hex(root),
                        "intermediate": pki.serial_hex(intermediate),
                    },
                )
            finally:
                ledger.close()
            state = store.State(
                trust_domain=trust_domain,
                roots=(root_name,),
                issuing_root=root_name,
                intermediate=int_name,
                sequence=1,
                created_at=pki.rfc3339(now),
            )
            sd.write_state(state)
        except BaseException:
            sd.abandon()
            raise
        return state


def ensure_jwt_key(where: Path | store.StateStore) -> ec.EllipticCurvePrivateKey:
    """The JWT-SVID signing key; made once for a CA created before JWT-SVIDs existed."""
    sd = store.open_state(where)
    if not sd.has(store.JWT_KEY_FILE):
        with sd.locked():
            if not sd.has(store.JWT_KEY_FILE):
                sd.write_key(store.JWT_KEY_FILE, pki.key_pem(pki.new_key()))
                sd.write_state(sd.read_state())  # a store commits new material with the state
    return sd.key(store.JWT_KEY_FILE)
