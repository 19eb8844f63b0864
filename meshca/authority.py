"""The CA's signing material: creating a new CA in a home directory and loading the active one.

`Authority` holds the trusted roots, the issuing intermediate and its key, and
signs leaves. It is immutable: a change of state (rotation, later) builds a new
Authority and swaps it in whole.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca import pki, store
from meshca.errors import StateError
from meshca.spiffe import InvalidSpiffeId, SpiffeId, validate_trust_domain


def _tag(cert: x509.Certificate) -> str:
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return ski.digest.hex()[:8]


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise StateError(f"missing {path}") from None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise StateError(f"{path} is not a PEM certificate") from None


def load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM EC private key; StateError (never the key text) on failure."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise StateError(f"missing {path}") from None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise StateError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateError(f"{path} is not an EC private key")
    return key


@dataclass(frozen=True)
class Authority:
    """The loaded CA: bundle roots, the issuing intermediate and (hidden from repr) its key."""

    home: Path
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
    def load(cls, home: Path) -> Authority:
        """Read state.json and the files it names; StateError naming what is missing or bad."""
        state = store.read_state(home)
        roots = tuple(_load_cert(home / f"{name}.crt") for name in state.roots)
        intermediate = _load_cert(home / f"{state.intermediate}.crt")
        key = load_ec_key(home / f"{state.intermediate}.key")
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
        endorsements = tuple(_load_cert(home / f"{name}.crt") for name in state.endorsements)
        return cls(home, state, roots, intermediate, key, endorsements)

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
    home: Path, trust_domain: str = "cluster.local", clock: store.Clock = store.utcnow
) -> store.State:
    """Create a new CA in `home`: root (10 y), intermediate (1 y, pathlen 0), token key, ledger.

    Refuses (StateError, nothing changed) when `home` already holds a CA or other
    files. Safe against a concurrent init (lock) and a crash (state.json written last).
    """
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as e:
        raise StateError(f"--trust-domain: {e}") from None
    if home.exists() and not home.is_dir():
        raise StateError(f"{home} exists and is not a directory")
    if home.exists():
        store.check_empty_for_init(home)  # refuse before creating even the lock file
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    with store.locked(home):
        for leftover in store.check_empty_for_init(home):
            leftover.unlink()  # an earlier init crashed before writing state.json
        os.chmod(home, 0o700)
        now = clock()
        root_key = pki.new_key()
        root = pki.build_root(root_key, now)
        int_key = pki.new_key()
        intermediate = pki.build_intermediate(int_key, root, root_key, now)
        root_name, int_name = f"root-{_tag(root)}", f"issuing-{_tag(intermediate)}"
        store.create_exclusive(home / f"{root_name}.key", pki.key_pem(root_key))
        store.create_exclusive(home / f"{root_name}.crt", pki.cert_pem(root), 0o644)
        store.create_exclusive(home / f"{int_name}.key", pki.key_pem(int_key))
        store.create_exclusive(home / f"{int_name}.crt", pki.cert_pem(intermediate), 0o644)
        store.create_exclusive(home / store.TOKEN_KEY_FILE, pki.key_pem(pki.new_key()))
        store.create_exclusive(home / store.JWT_KEY_FILE, pki.key_pem(pki.new_key()))
        ledger = store.Ledger(home / store.LEDGER_FILE, clock)
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
        store.atomic_write(home / store.STATE_FILE, state.to_json(), 0o644)
        return state


def ensure_jwt_key(home: Path) -> ec.EllipticCurvePrivateKey:
    """The JWT-SVID signing key; made once for a CA created before JWT-SVIDs existed."""
    path = home / store.JWT_KEY_FILE
    if not path.exists():
        with store.locked(home):
            if not path.exists():
                store.create_exclusive(path, pki.key_pem(pki.new_key()))
                store.fsync_dir(home)
    return load_ec_key(path)
