"""The CA's state on PostgreSQL, shared by CA replicas: `PgState`, a `store.StateStore`.

What `StateDir` keeps in files of `--home`, this keeps in the shared database (schema
version 2, `meshca.pgstore`): the state record (`ca_state`, one row with a `revision`
that moves with every change), the CA certificates and private keys (`ca_material`, the
keys sealed with the KEK of `meshca.kek`, which is never stored there), and which
replicas served recently (`replicas`).

- A change (init, a rotation step) is made under `locked()`: a session-level advisory
  lock on a connection of its own, so one change runs at a time across the cluster and a
  replica that dies mid-step releases it with its connection. New material is kept in
  memory until `write_state`, which writes it, the new state record and a
  `NOTIFY meshca_state` in one transaction: other replicas see all of a step or none.
- `write_state` also checks that the record is still the revision read under the lock,
  so a writer that somehow lost its lock cannot overwrite a newer state.
- `listen` waits for the NOTIFY of other replicas' changes (a replica also polls
  `revision()`, for a notification lost while its connection was down).
- A database that cannot be reached is `Unavailable` (503); nothing of the DSN, its
  password or a key reaches a message or a log line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.errors import StateError, Unavailable
from meshca.kek import Kek
from meshca.pgstore import (
    _CONNECTION_ERRORS,
    POOL_TIMEOUT,
    Connection,
    PgLedger,
    _Dsn,
    _version,
    check_schema,
    open_pool,
)
from meshca.store import STATE_FILE, Clock, State, iso, utcnow

log = logging.getLogger("meshca.pgstate")

CHANNEL = "meshca_state"
# pg_advisory_lock key of a change to the CA's state: "meshca:r" as a big-endian int64.
CHANGE_LOCK = int.from_bytes(b"meshca:r", "big")
PING_TIMEOUT = 1.0  # seconds /readyz waits for a connection
REPLICA_TTL = dt.timedelta(days=1)  # a replica not seen for this long leaves the table
LOCK_WAIT = "60s"
LOCK_SESSION = (
    "idle_session_timeout = '60s'",  # PostgreSQL 14+ (an older server skips it)
    "tcp_keepalives_idle = 10",
    "tcp_keepalives_interval = 5",
    "tcp_keepalives_count = 3",
)  # how long `locked()` waits for another replica's change to finish


def _material_name(name: str) -> str:
    """Row name of a certificate or key (`token-signing.key` -> `token-signing`)."""
    return name.removesuffix(".key")


def _state_parts(revision: int, doc: str) -> tuple[bytes, ...]:
    """What a state record's MAC covers: the revision too (a writer without the KEK cannot
    give an old record a new revision)."""
    return (b"ca_state", str(revision).encode(), doc.encode())


def _material_parts(name: str, cert_pem: str | None, sealed: bytes | None) -> tuple[bytes, ...]:
    """What a material row's MAC covers (None and empty told apart)."""
    return (
        b"ca_material",
        name.encode(),
        b"-" if cert_pem is None else b"+" + cert_pem.encode(),
        b"-" if sealed is None else b"+" + sealed,
    )


class PgState:
    """The CA's state, certificates and sealed keys in PostgreSQL. Thread-safe: reads take
    a connection from a small pool; a change is made by one thread at a time (`locked`)."""

    kind = "postgresql"

    def __init__(
        self,
        dsn: str,
        kek: Kek,
        clock: Clock = utcnow,
        *,
        migrate: bool = False,
        timeout: float = POOL_TIMEOUT,
    ) -> None:
        self._dsn_text = dsn
        self._dsn = _Dsn(dsn)
        self._kek = kek
        self.clock = clock
        self.timeout = timeout
        self.schema_version = check_schema(self._dsn, migrate)
        self._pool = open_pool(self._dsn, "meshca-state", 3, timeout)
        self._change = threading.Lock()  # one change at a time in this process
        self._owner: int | None = None  # the thread making a change (holding `_change`)
        self._conn: Connection | None = None  # its connection (holding the advisory lock)
        self._seen: int = 0  # the revision the change started from
        # name -> (certificate PEM, sealed key, may replace a stored one)
        self._pending: dict[str, tuple[str | None, bytes | None, bool]] = {}

    def __repr__(self) -> str:
        return f"<PgState {self._dsn.where}>"

    @property
    def kek_id(self) -> str:
        """The id of the KEK this store's keys are opened with."""
        return self._kek.kek_id

    def describe(self) -> str:
        """Where the state is: `postgresql://host:port/db` (never a user or password)."""
        return f"postgresql://{self._dsn.where}"

    def close(self) -> None:
        """Close the pool."""
        self._pool.close()

    # -- connections -------------------------------------------------------------------

    def _mine(self) -> bool:
        return self._owner == threading.get_ident()

    def _unavailable(self, what: str, e: BaseException) -> Unavailable:
        log.error(
            "state database %s unreachable; %s not done: %s",
            self._dsn.where,
            what,
            self._dsn.describe(e),
        )
        return Unavailable("the CA cannot reach its database right now; nothing was changed")

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        """The change's own connection for its thread, else one from the pool."""
        if self._mine() and self._conn is not None:
            try:
                yield self._conn
            except _CONNECTION_ERRORS as e:
                raise self._unavailable(what, e) from None
            return
        try:
            with self._pool.connection() as conn:
                yield conn
        except _CONNECTION_ERRORS as e:
            raise self._unavailable(what, e) from None

    def _one(self, what: str, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        with self._read(what) as conn:
            return conn.execute(sql, args).fetchone()

    # -- reads -------------------------------------------------------------------------

    def exists(self) -> bool:
        """Does the store hold a CA?"""
        return self._one("reading the state", "SELECT 1 FROM ca_state WHERE id = 1") is not None

    def revision(self) -> object:
        """The state record's revision (0 before `meshca init`): moves with every change."""
        row = self._one("reading the state", "SELECT revision FROM ca_state WHERE id = 1")
        return int(row[0]) if row else 0

    def read_state(self) -> State:
        """The state record; StateError when the store holds no CA or a bad record."""
        row = self._one(
            "reading the state", "SELECT revision, doc, mac, kek_id FROM ca_state WHERE id = 1"
        )
        if row is None:
            raise StateError(
                f"no CA in the store at {self.describe()}; run 'meshca init' with this store, "
                "or 'meshca serve --init-if-missing'"
            )
        if row[3] != self._kek.kek_id:
            raise StateError(
                f"the CA in {self.describe()} was sealed with another key-encryption key "
                f"(id {row[3]}; {self._kek.source} has id {self._kek.kek_id})"
            )
        if not self._kek.verify(bytes(row[2]), *_state_parts(int(row[0]), row[1])):
            raise StateError(self._forged("the state record"))
        if self._mine():
            self._seen = int(row[0])
        return State.from_json(row[1].encode(), f"{STATE_FILE} in {self.describe()}")

    def _forged(self, what: str) -> str:
        return (
            f"{what} in {self.describe()} does not verify with the key-encryption key "
            f"({self._kek.source}, id {self._kek.kek_id}): it was written with another KEK, "
            "or changed by something other than meshca"
        )

    def _checked(self, name: str, cert_pem: str | None, sealed: bytes | None, mac: bytes) -> None:
        if not self._kek.verify(mac, *_material_parts(name, cert_pem, sealed)):
            raise StateError(self._forged(f"the CA material {name!r}"))

    def _material(self, name: str) -> tuple[str | None, bytes | None] | None:
        row_name = _material_name(name)
        if self._mine() and row_name in self._pending:
            return self._pending[row_name][:2]
        row = self._one(
            "reading CA material",
            "SELECT cert_pem, key_sealed, mac FROM ca_material WHERE name = %s",
            (row_name,),
        )
        if row is None:
            return None
        cert_pem, sealed = row[0], bytes(row[1]) if row[1] is not None else None
        self._checked(row_name, cert_pem, sealed, bytes(row[2]))
        return cert_pem, sealed

    def cert(self, name: str) -> x509.Certificate:
        """The certificate `name`; StateError if the store has none or a bad one."""
        found = self._material(name)
        if found is None or found[0] is None:
            raise StateError(f"missing certificate {name} in {self.describe()}")
        try:
            return x509.load_pem_x509_certificate(found[0].encode())
        except ValueError:
            raise StateError(f"certificate {name} in {self.describe()} is not PEM") from None

    def key(self, name: str) -> ec.EllipticCurvePrivateKey:
        """The private key of `name`, unsealed with the KEK; StateError (never key bytes)."""
        row_name = _material_name(name)
        found = self._material(row_name)
        if found is None or found[1] is None:
            raise StateError(f"missing private key {row_name} in {self.describe()}")
        pem = self._kek.open(row_name, found[1])
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise StateError(f"the private key {row_name} is not a PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise StateError(f"the private key {row_name} is not an EC key")
        return key

    def certs(self, kind: str) -> list[x509.Certificate]:
        """Every certificate of a kind (`root`, `issuing`, `endorse`), by name."""
        with self._read("reading CA material") as conn:
            rows = conn.execute(
                "SELECT name, cert_pem, key_sealed, mac FROM ca_material WHERE name LIKE %s "
                "AND cert_pem IS NOT NULL",
                (kind + "-%",),
            ).fetchall()
        for name, cert_pem, sealed, mac in rows:
            self._checked(name, cert_pem, bytes(sealed) if sealed is not None else None, bytes(mac))
        found = {r[0]: r[1] for r in rows}
        if self._mine():
            found.update(
                {n: p[0] for n, p in self._pending.items() if n.startswith(kind + "-") and p[0]}
            )
        return [x509.load_pem_x509_certificate(found[n].encode()) for n in sorted(found)]

    def has(self, filename: str) -> bool:
        """Is there a key (`*.key`) or certificate of that name?"""
        found = self._material(filename)
        if found is None:
            return False
        return found[1] is not None if filename.endswith(".key") else found[0] is not None

    # -- a change ----------------------------------------------------------------------

    def _check_changing(self) -> None:
        if not self._mine():
            raise StateError("a change to the CA's state is made under locked()")

    def write_pair(self, name: str, key_pem: bytes, cert_pem: bytes, replace: bool = False) -> str:
        """A new key (sealed) and certificate under `name`, written with the next state."""
        self._check_changing()
        row = _material_name(name)
        self._pending[row] = (cert_pem.decode(), self._kek.seal(row, key_pem), replace)
        return row

    def write_cert(self, name: str, cert_pem: bytes, replace: bool = False) -> str:
        """A new certificate under `name`, written with the next state."""
        self._check_changing()
        self._pending[name] = (cert_pem.decode(), None, replace)
        return name

    def write_key(self, filename: str, key_pem: bytes) -> None:
        """A new signing key (sealed), written with the next state."""
        self._check_changing()
        row = _material_name(filename)
        self._pending[row] = (None, self._kek.seal(row, key_pem), False)

    def abandon(self) -> None:
        """Forget the material written since the last `write_state` (nothing was stored)."""
        self._pending.clear()

    def write_state(self, state: State) -> None:
        """Store the pending material and `state` in one transaction, and tell the other
        replicas (NOTIFY). StateError if the record moved since it was read under the lock."""
        self._check_changing()
        conn = self._conn
        assert conn is not None
        now = iso(self.clock())
        try:
            with conn.transaction():
                row = conn.execute(
                    "SELECT revision FROM ca_state WHERE id = 1 FOR UPDATE"
                ).fetchone()
                current = int(row[0]) if row else 0
                if current != self._seen:
                    raise StateError(
                        f"the CA's state in {self.describe()} changed under this change "
                        f"(revision {self._seen} -> {current}); nothing was written"
                    )
                for name, (cert_pem, sealed, replace) in self._pending.items():
                    cur = conn.execute(
                        "INSERT INTO ca_material (name, cert_pem, key_sealed, created_at, mac) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO "
                        + (
                            "UPDATE SET cert_pem = EXCLUDED.cert_pem, "
                            "key_sealed = EXCLUDED.key_sealed, created_at = EXCLUDED.created_at, "
                            "mac = EXCLUDED.mac"
                            if replace
                            else "NOTHING"
                        ),
                        (
                            name,
                            cert_pem,
                            sealed,
                            now,
                            self._kek.mac(*_material_parts(name, cert_pem, sealed)),
                        ),
                    )
                    if cur.rowcount != 1:
                        raise StateError(
                            f"{name} already exists in {self.describe()}; nothing was written"
                        )
                revision = current + 1
                doc = state.to_json().decode()
                conn.execute(
                    "INSERT INTO ca_state (id, revision, doc, updated_at, kek_id, mac) "
                    "VALUES (1, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                    "revision = EXCLUDED.revision, doc = EXCLUDED.doc, "
                    "updated_at = EXCLUDED.updated_at, kek_id = EXCLUDED.kek_id, "
                    "mac = EXCLUDED.mac",
                    (
                        revision,
                        doc,
                        now,
                        self._kek.kek_id,
                        self._kek.mac(*_state_parts(revision, doc)),
                    ),
                )
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(revision)))
        except _CONNECTION_ERRORS as e:
            # Lost while committing: whether it landed is unknown; the next read tells.
            raise self._unavailable("writing the CA's state", e) from None
        self._seen = revision
        self._pending.clear()
        log.info("CA state in %s is at revision %d", self.describe(), revision)

    @contextlib.contextmanager
    def locked(self, wait: bool = True) -> Iterator[None]:
        """Hold the cluster-wide change lock (waits up to a minute for another replica's
        change, or StateError at once when `wait` is False)."""
        with self._change:
            try:
                conn = self._dsn.connect()
            except Unavailable:
                raise Unavailable(
                    "the CA cannot reach its database right now; nothing was changed"
                ) from None
            try:
                try:
                    # The session holds the lock: if this replica stalls or is cut off
                    # (not only if it dies), the server ends the session and frees the lock
                    # within a minute, rather than after the kernel's two hours.
                    for setting in LOCK_SESSION:
                        with contextlib.suppress(psycopg.errors.UndefinedObject):
                            conn.execute(f"SET {setting}")
                    if wait:
                        conn.execute(f"SET lock_timeout = '{LOCK_WAIT}'")
                        conn.execute(f"SET statement_timeout = '{LOCK_WAIT}'")
                        conn.execute("SELECT pg_advisory_lock(%s)", (CHANGE_LOCK,))
                    else:
                        row = conn.execute(
                            "SELECT pg_try_advisory_lock(%s)", (CHANGE_LOCK,)
                        ).fetchone()
                        if not row or not row[0]:
                            raise StateError(
                                f"another meshca is changing the CA in {self.describe()}; try again"
                            )
                except psycopg.errors.LockNotAvailable:
                    raise StateError(
                        f"another meshca has been changing the CA in {self.describe()} for "
                        f"over {LOCK_WAIT}; try again"
                    ) from None
                except _CONNECTION_ERRORS as e:
                    raise self._unavailable("taking the change lock", e) from None
                row = conn.execute("SELECT revision FROM ca_state WHERE id = 1").fetchone()
                self._seen = int(row[0]) if row else 0
                self._owner, self._conn = threading.get_ident(), conn
                try:
                    yield
                finally:
                    self._pending.clear()
                    self._owner, self._conn = None, None
            finally:
                conn.close()  # closing the session releases the advisory lock

    def rekey(self, new: Kek) -> int:
        """Re-seal every key and re-authenticate every row under the KEK `new`, in one
        transaction under the change lock (a new revision, so every replica notices); the
        number of keys re-sealed. Replicas still on the old KEK keep serving what they
        loaded, refuse changes, and must be restarted with the new one."""
        with self.locked():
            state = self.read_state()  # checks the state record with the current KEK
            conn = self._conn
            assert conn is not None
            now = iso(self.clock())
            try:
                with conn.transaction():
                    rows = conn.execute(
                        "SELECT name, cert_pem, key_sealed, mac FROM ca_material FOR UPDATE"
                    ).fetchall()
                    keys = 0
                    for name, cert_pem, sealed, mac in rows:
                        sealed = bytes(sealed) if sealed is not None else None
                        self._checked(name, cert_pem, sealed, bytes(mac))
                        if sealed is not None:
                            sealed = new.seal(name, self._kek.open(name, sealed))
                            keys += 1
                        conn.execute(
                            "UPDATE ca_material SET key_sealed = %s, mac = %s WHERE name = %s",
                            (sealed, new.mac(*_material_parts(name, cert_pem, sealed)), name),
                        )
                    revision = self._seen + 1
                    doc = state.to_json().decode()
                    conn.execute(
                        "UPDATE ca_state SET revision = %s, doc = %s, updated_at = %s, "
                        "kek_id = %s, mac = %s WHERE id = 1 AND revision = %s",
                        (revision, doc, now, new.kek_id, new.mac(*_state_parts(revision, doc)),
                         self._seen),
                    )  # fmt: skip
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(revision)))
            except _CONNECTION_ERRORS as e:
                raise self._unavailable("re-sealing the CA keys", e) from None
            self._kek = new
            log.warning(
                "CA keys in %s re-sealed with the key-encryption key %s (%d keys); restart the "
                "replicas with it",
                self.describe(),
                new.kek_id,
                keys,
            )
            return keys

    @contextlib.contextmanager
    def initializing(self) -> Iterator[None]:
        """The change lock for `meshca init`; StateError (nothing changed) if the store
        already holds a CA."""
        with self.locked():
            if self.exists():
                raise StateError(
                    f"a CA already exists in {self.describe()}; refusing to overwrite it "
                    "(nothing was changed)"
                )
            yield

    def ledger(self, clock: Clock = utcnow) -> PgLedger:
        """The issuance ledger in the same database (its own pool; close it when done)."""
        return PgLedger(self._dsn_text, clock, timeout=self.timeout)

    # -- replicas, notifications -------------------------------------------------------

    def heartbeat(self, name: str, url: str, version: str, started_at: str, revision: int) -> None:
        """Record that replica `name` is serving (for `meshca status`)."""
        now = iso(self.clock())
        with self._read("recording the heartbeat") as conn:
            conn.execute(
                "INSERT INTO replicas (name, url, version, started_at, seen_at, revision) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                "url = EXCLUDED.url, version = EXCLUDED.version, "
                "started_at = EXCLUDED.started_at, seen_at = EXCLUDED.seen_at, "
                "revision = EXCLUDED.revision",
                (name, url, version, started_at, now, revision),
            )
            # Replicas gone for a day (pods replaced) are forgotten.
            conn.execute(
                "DELETE FROM replicas WHERE seen_at < %s",
                (iso(self.clock() - REPLICA_TTL),),
            )

    def replicas(self, since: str) -> list[dict[str, Any]]:
        """Replicas seen at or after `since` (ISO), most recent first."""
        with self._read("reading replicas") as conn:
            cur = conn.execute(
                "SELECT name, url, version, started_at, seen_at, revision FROM replicas "
                "WHERE seen_at >= %s ORDER BY seen_at DESC, name",
                (since,),
            )
            cols = [c.name for c in cur.description or ()]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def ping(self) -> int:
        """The schema version, read now: Unavailable when the database cannot be reached
        (within PING_TIMEOUT: a readiness probe's answer should not take the pool's wait)."""
        try:
            with self._pool.connection(timeout=min(self.timeout, PING_TIMEOUT)) as conn:
                return _version(conn)
        except _CONNECTION_ERRORS as e:
            raise self._unavailable("checking the database", e) from None

    def listen(self, on_change: Callable[[], None], stop: threading.Event) -> None:
        """Call `on_change` on each NOTIFY of a state change until `stop` is set (blocking:
        run it on a thread). A lost connection is re-made every second meanwhile; the
        replica's polling covers what is missed then."""
        warned = False
        while not stop.is_set():
            try:
                conn = psycopg.connect(self._dsn.conninfo, autocommit=True)
            except _CONNECTION_ERRORS as e:
                if not warned:
                    log.warning(
                        "cannot listen for state changes on %s (polling meanwhile): %s",
                        self._dsn.where,
                        self._dsn.describe(e),
                    )
                    warned = True
                stop.wait(1.0)
                continue
            warned = False
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                on_change()  # whatever changed while not listening
                while not stop.is_set():
                    for _ in conn.notifies(timeout=0.5):
                        on_change()
            except _CONNECTION_ERRORS as e:
                log.warning(
                    "lost the state-change listener on %s: %s",
                    self._dsn.where,
                    self._dsn.describe(e),
                )
                stop.wait(1.0)
            finally:
                conn.close()
