"""The CA's ledger on PostgreSQL, shared by several CA replicas: `PgLedger` and `migrate`.

A second implementation of `store.LedgerStore`, with the same answers as the SQLite
`Ledger` (the same ISO time strings, the same orders, TokenAlreadyUsed / UnknownToken /
Unavailable alike). Imported only when a PostgreSQL store is configured, so the SQLite path
never loads psycopg.

- Every write is one transaction on a connection from a small pool; the join token is
  consumed by `UPDATE ... WHERE used_at IS NULL`, which PostgreSQL's row lock makes
  exactly-once across replicas (a loser waits for the winner's commit, then finds the
  token used).
- A database that cannot be reached (down, refusing, the pool exhausted past its
  timeout) becomes `Unavailable` (503): the transaction is rolled back whole, so nothing
  is half-recorded. The DSN and its password never reach a message or a log line.
- The schema is versioned (`meshca_schema`) and created or upgraded by `migrate` under a
  transaction-level advisory lock, so replicas that start at once migrate one at a time.
  Times are TEXT in the ledger's own format (`store.iso`, RFC 3339 UTC, microseconds),
  byte-ordered (`COLLATE "C"`, as SQLite compares) and checked by the `meshca_time` domain,
  so that comparing them as text is comparing them as times.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import select
import urllib.parse
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from meshca.errors import StateError, Unavailable
from meshca.store import Clock, IssuedRecord, TokenAlreadyUsed, UnknownToken, iso, utcnow

log = logging.getLogger("meshca.pgstore")

POOL_MIN = 1
POOL_MAX = 8
CONNECT_TIMEOUT = 3  # seconds libpq tries one connection (unless the DSN says otherwise)
# ms sent data may stay unacknowledged before the connection is dropped (unless the DSN says
# otherwise): a database cut off by the network is a 503 after 10 s, not after the kernel's
# 15 minutes of retransmissions.
TCP_USER_TIMEOUT = 10_000
POOL_TIMEOUT = 5.0  # seconds a call waits for a connection before it is Unavailable
STATEMENT_TIMEOUT = 10_000  # ms a statement may run (unless the DSN's options say otherwise)
LOCK_TIMEOUT = 5_000  # ms a statement may wait for a row or table lock (idem)
# pg_advisory_xact_lock key of `migrate`: "meshca:m" as a big-endian int64.
MIGRATE_LOCK = int.from_bytes(b"meshca:m", "big")
UNREACHABLE = "the CA cannot reach its database right now; nothing was recorded or issued"
IN_DOUBT = "the CA lost its database while committing; it cannot tell whether this was recorded"

# Version N is _MIGRATIONS[N - 1]; append, never edit, once released.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        r"""CREATE DOMAIN meshca_time AS TEXT COLLATE "C"
            CHECK (VALUE ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$')""",
        """CREATE TABLE certificates (
            serial      TEXT COLLATE "C" PRIMARY KEY,
            spiffe_id   TEXT COLLATE "C" NOT NULL,
            not_before  meshca_time NOT NULL,
            not_after   meshca_time NOT NULL,
            issued_at   meshca_time NOT NULL,
            credential  TEXT NOT NULL,
            issuer      TEXT COLLATE "C" NOT NULL,
            sha256      TEXT NOT NULL,
            peer        TEXT,
            revoked_at  meshca_time
        )""",
        "CREATE INDEX certificates_by_id ON certificates (spiffe_id)",
        # `active` counts, latest_not_after, leaves_in_use
        "CREATE INDEX certificates_by_not_after ON certificates (not_after)",
        # revoked_serials (every bundle answer): the revoked rows alone, serial included
        """CREATE INDEX certificates_revoked ON certificates (not_after) INCLUDE (serial)
            WHERE revoked_at IS NOT NULL""",
        # certificates(limit=...), newest first
        "CREATE INDEX certificates_by_issued_at ON certificates (issued_at DESC, serial)",
        """CREATE TABLE refusals (
            id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at          meshca_time NOT NULL,
            spiffe_id   TEXT,
            credential  TEXT NOT NULL,
            code        TEXT NOT NULL,
            reason      TEXT NOT NULL,
            peer        TEXT
        )""",
        """CREATE TABLE join_tokens (
            jti         TEXT PRIMARY KEY,
            spiffe_id   TEXT NOT NULL,
            minted_at   meshca_time NOT NULL,
            expires_at  meshca_time NOT NULL,
            used_at     meshca_time,
            used_serial TEXT
        )""",
        """CREATE TABLE bans (
            spiffe_id   TEXT COLLATE "C" PRIMARY KEY,
            banned_at   meshca_time NOT NULL,
            until       meshca_time
        )""",
        """CREATE TABLE events (
            id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at          meshca_time NOT NULL,
            kind        TEXT NOT NULL,
            detail      JSONB NOT NULL
        )""",
    ),
    (
        # The CA's state record (state.json's document), one row; `revision` bumps with
        # every change, and replicas reload when it moves (NOTIFY meshca_state, or polling).
        """CREATE TABLE ca_state (
            id          INTEGER PRIMARY KEY CHECK (id = 1),
            revision    BIGINT NOT NULL,
            doc         TEXT NOT NULL,
            updated_at  meshca_time NOT NULL,
            kek_id      TEXT NOT NULL,
            mac         BYTEA NOT NULL
        )""",
        # CA certificates and private keys by base name (root-<tag>, issuing-<tag>,
        # endorse-<tag>-<serial>, token-signing, jwt-signing); keys sealed with the KEK,
        # and every row of both tables authenticated by an HMAC under it (meshca.kek).
        """CREATE TABLE ca_material (
            name        TEXT COLLATE "C" PRIMARY KEY,
            cert_pem    TEXT,
            key_sealed  BYTEA,
            created_at  meshca_time NOT NULL,
            mac         BYTEA NOT NULL,
            CHECK (cert_pem IS NOT NULL OR key_sealed IS NOT NULL)
        )""",
        # Replicas that served recently (a heartbeat each reload interval): `meshca status`.
        """CREATE TABLE replicas (
            name        TEXT PRIMARY KEY,
            url         TEXT,
            version     TEXT,
            started_at  meshca_time NOT NULL,
            seen_at     meshca_time NOT NULL,
            revision    BIGINT
        )""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_CERT_COLUMNS = (
    "serial, spiffe_id, not_before, not_after, issued_at, credential, issuer, sha256, peer,"
    " revoked_at"
)
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
Connection = psycopg.Connection[TupleRow]


class _Dsn:
    """A DSN kept out of sight: the connection string for libpq, where it points (host,
    port, database: safe to log), and a scrubber for anything that might quote it."""

    def __init__(self, dsn: str) -> None:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error:
            # libpq's complaint may quote the DSN, password included: say only that.
            raise StateError(
                "the PostgreSQL store's DSN is not a valid connection string or URI"
            ) from None
        params.setdefault("connect_timeout", CONNECT_TIMEOUT)
        params.setdefault("tcp_user_timeout", TCP_USER_TIMEOUT)
        params.setdefault("application_name", "meshca")
        # A statement stuck behind a lock (an operator's LOCK TABLE, a runaway query) is a
        # 503 after seconds, not a request that hangs until the client gives up.
        options = str(params.get("options") or "")
        for setting, value in (
            ("statement_timeout", STATEMENT_TIMEOUT),
            ("lock_timeout", LOCK_TIMEOUT),
        ):
            if setting not in options:
                options += f" -c {setting}={value}"
        params["options"] = options.strip()
        self.conninfo = make_conninfo("", **params)
        password = str(params.get("password") or "")
        secrets = (dsn, self.conninfo, password, urllib.parse.quote(password, safe=""))
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        host = str(params.get("host") or params.get("hostaddr") or "localhost")
        port = str(params.get("port") or 5432)
        self.where = f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"

    def __repr__(self) -> str:
        return f"<DSN {self.where}>"

    def scrub(self, text: str) -> str:
        """`text` with the DSN and its password replaced by `***`."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def describe(self, e: BaseException) -> str:
        """An exception as `Type: message`, on one line, scrubbed."""
        message = " ".join(str(e).split())
        return self.scrub(f"{type(e).__name__}: {message}" if message else type(e).__name__)

    def connect(self) -> Connection:
        """One connection outside the pool (migrations, the start-up check); Unavailable
        naming the cause (scrubbed) when the database cannot be reached."""
        try:
            return psycopg.connect(self.conninfo, autocommit=True)
        except _CONNECTION_ERRORS as e:
            raise Unavailable(
                f"cannot reach the ledger database at {self.where}: {self.describe(e)}"
            ) from None


def migrate(dsn: str) -> int:
    """Create the ledger's tables or upgrade them to `SCHEMA_VERSION`; the version now.

    Safe to run from several replicas at once: the migration runs under a transaction-level
    advisory lock, so the others wait and then find nothing left to do. StateError if the
    database is newer than this meshca; Unavailable if it cannot be reached."""
    target = _Dsn(dsn)
    conn = target.connect()
    try:
        with conn.transaction():
            return _apply_migrations(conn, target)
    except _CONNECTION_ERRORS as e:
        raise Unavailable(
            f"cannot migrate the ledger database at {target.where}: {target.describe(e)}"
        ) from None
    finally:
        conn.close()


def _apply_migrations(conn: Connection, where: _Dsn) -> int:
    # A migration may wait for another replica's, and may take long on a big ledger.
    conn.execute("SET LOCAL statement_timeout = 0")
    conn.execute("SET LOCAL lock_timeout = 0")
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
    conn.execute(
        "CREATE TABLE IF NOT EXISTS meshca_schema ("
        " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    found = _version(conn)
    if found > SCHEMA_VERSION:
        raise StateError(_newer(where, found))
    for version in range(found + 1, SCHEMA_VERSION + 1):
        for stmt in _MIGRATIONS[version - 1]:
            conn.execute(stmt)
        conn.execute(
            "INSERT INTO meshca_schema (version, applied_at) VALUES (%s, %s)",
            (version, iso(utcnow())),
        )
        log.info("ledger database %s: schema migrated to version %d", where.where, version)
    return SCHEMA_VERSION


def _no_nul(text: str | None) -> str | None:
    return text.replace("\x00", "\ufffd") if text else text


def _check_idle_connection(conn: Connection) -> None:
    """The pool's check of a connection before handing it out, without a round trip in the
    usual case: an idle connection has nothing to read unless the server closed it or sent
    something (a restart, a crash, a terminated backend), and only then is it tried."""
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)  # reads it: raises if the server has gone


def _version(conn: Connection) -> int:
    """The schema version of the database (0 when it has no meshca_schema table)."""
    row = conn.execute("SELECT to_regclass('meshca_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT max(version) FROM meshca_schema").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _newer(where: _Dsn, found: int) -> str:
    return (
        f"the ledger database at {where.where} has schema version {found}, newer than this "
        f"meshca knows ({SCHEMA_VERSION}); run a newer meshca"
    )


def check_schema(dsn: _Dsn, migrate: bool) -> int:
    """Connect once: with `migrate`, create or upgrade the schema; without, refuse a database
    whose schema is missing or older (StateError: run `meshca migrate`) or newer. The
    version; Unavailable when the database cannot be reached."""
    conn = dsn.connect()
    try:
        if migrate:
            with conn.transaction():
                return _apply_migrations(conn, dsn)
        found = _version(conn)
    except _CONNECTION_ERRORS as e:
        raise Unavailable(
            f"cannot reach the ledger database at {dsn.where}: {dsn.describe(e)}"
        ) from None
    finally:
        conn.close()
    if found > SCHEMA_VERSION:
        raise StateError(_newer(dsn, found))
    if found < SCHEMA_VERSION:
        what = "no meshca schema" if found == 0 else f"schema version {found}"
        raise StateError(
            f"the ledger database at {dsn.where} has {what}; this meshca needs "
            f"version {SCHEMA_VERSION}: run 'meshca migrate' first"
        )
    return found


def open_pool(dsn: _Dsn, name: str, max_size: int, timeout: float) -> ConnectionPool[Connection]:
    """A pool of autocommit connections (min 1), open; Unavailable if none can be made."""
    pool: ConnectionPool[Connection] = ConnectionPool(
        dsn.conninfo,
        kwargs={"autocommit": True},
        min_size=POOL_MIN,
        max_size=max_size,
        timeout=timeout,
        # A connection the server closed (a restart, a crash, a terminated backend) is
        # replaced before it is handed out: the first call after a restart succeeds.
        check=_check_idle_connection,
        # A connection attempt that fails is retried with a doubling delay until
        # `reconnect_timeout` (psycopg_pool's default: 5 min, with delays of up to
        # 2 min): after an outage of a minute, the CA would stay unavailable for
        # another half minute with its database back. Giving up after `timeout`
        # instead, the next call starts a new attempt at once.
        reconnect_timeout=timeout,
        name=name,
        open=False,
    )
    try:
        pool.open(wait=True, timeout=timeout)
    except _CONNECTION_ERRORS as e:
        pool.close()
        raise Unavailable(
            f"cannot reach the ledger database at {dsn.where}: {dsn.describe(e)}"
        ) from None
    return pool


class PgLedger:
    """The issuance ledger in PostgreSQL, shared by CA replicas. Thread-safe: each call takes
    a connection from the pool (min 1, max 8) and gives it back.

    With `migrate` the schema is created or upgraded first; without, a database whose
    schema is missing or older is refused (StateError: run `meshca migrate`). `timeout`
    bounds how long a call waits for a connection when the database is unreachable.
    """

    def __init__(
        self,
        dsn: str,
        clock: Clock = utcnow,
        migrate: bool = False,
        *,
        timeout: float = POOL_TIMEOUT,
    ) -> None:
        self.clock = clock
        self._dsn = _Dsn(dsn)
        check_schema(self._dsn, migrate)
        self._pool = open_pool(self._dsn, "meshca-ledger", POOL_MAX, timeout)

    def __repr__(self) -> str:
        return f"<PgLedger {self._dsn.where}>"

    def close(self) -> None:
        """Close the pool and its connections."""
        self._pool.close()

    def _unavailable(self, what: str, e: BaseException, in_doubt: bool = False) -> Unavailable:
        if in_doubt:
            log.error(
                "ledger database %s: lost while committing %s; outcome unknown: %s",
                self._dsn.where,
                what,
                self._dsn.describe(e),
            )
            return Unavailable(IN_DOUBT)
        log.error(
            "ledger database %s unreachable; %s not done: %s",
            self._dsn.where,
            what,
            self._dsn.describe(e),
        )
        return Unavailable(UNREACHABLE)

    @contextlib.contextmanager
    def _tx(self, what: str) -> Iterator[Connection]:
        """One transaction; a database that cannot be reached rolls it back whole and becomes
        Unavailable (503). Losing the connection during COMMIT is told apart: in doubt."""
        committing = False
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield conn
                committing = True
        except _CONNECTION_ERRORS as e:
            raise self._unavailable(what, e, in_doubt=committing) from None

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        """A connection for reads (autocommit: one statement, one snapshot)."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except _CONNECTION_ERRORS as e:
            raise self._unavailable(what, e) from None

    # -- writes ------------------------------------------------------------------------

    def record_issued(self, rec: IssuedRecord, token_jti: str | None = None) -> None:
        """Record an issuance; when `token_jti` is given, consume that join token atomically.

        Raises TokenAlreadyUsed / UnknownToken (and records nothing) if the token
        cannot be consumed, so a certificate is never handed out on a replayed token.
        """
        with self._tx("recording an issuance") as db:
            if token_jti is not None:
                cur = db.execute(
                    "UPDATE join_tokens SET used_at = %s, used_serial = %s "
                    "WHERE jti = %s AND used_at IS NULL",
                    (rec.issued_at, rec.serial, token_jti),
                )
                if cur.rowcount != 1:
                    row = db.execute(
                        "SELECT used_at FROM join_tokens WHERE jti = %s", (token_jti,)
                    ).fetchone()
                    raise UnknownToken() if row is None else TokenAlreadyUsed()
            db.execute(
                f"INSERT INTO certificates ({_CERT_COLUMNS}) "  # noqa: S608 (constant columns)
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, NULL)",
                (
                    rec.serial,
                    rec.spiffe_id,
                    rec.not_before,
                    rec.not_after,
                    rec.issued_at,
                    rec.credential,
                    rec.issuer,
                    rec.sha256,
                    rec.peer,
                ),
            )

    def record_refusal(
        self, spiffe_id: str | None, credential: str, code: str, reason: str, peer: str | None
    ) -> None:
        """Record a refused request. A NUL character, which PostgreSQL's text cannot hold,
        is stored as U+FFFD: a refusal is recorded whatever the peer sent."""
        with self._tx("recording a refusal") as db:
            db.execute(
                "INSERT INTO refusals (at, spiffe_id, credential, code, reason, peer) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    iso(self.clock()),
                    *(_no_nul(v) for v in (spiffe_id, credential, code, reason, peer)),
                ),
            )

    def record_event(self, kind: str, detail: dict[str, Any]) -> None:
        """Record an administrative event (init, token minted, ...)."""
        with self._tx("recording an event") as db:
            db.execute(
                "INSERT INTO events (at, kind, detail) VALUES (%s, %s, %s)",
                (iso(self.clock()), kind, Jsonb(detail)),
            )

    def add_join_token(self, jti: str, spiffe_id: str, expires_at: dt.datetime) -> None:
        """Record a newly minted join token (never the token itself, only its id)."""
        with self._tx("recording a join token") as db:
            db.execute(
                "INSERT INTO join_tokens (jti, spiffe_id, minted_at, expires_at) "
                "VALUES (%s, %s, %s, %s)",
                (jti, spiffe_id, iso(self.clock()), iso(expires_at)),
            )

    def revoke_serial(self, serial: str) -> IssuedRecord | None:
        """Mark one certificate revoked (idempotent); None if the ledger has no such serial."""
        serial = serial.lower().replace(":", "")
        with self._tx("revoking a certificate") as db:
            db.execute(
                "UPDATE certificates SET revoked_at = %s WHERE serial = %s AND revoked_at IS NULL",
                (iso(self.clock()), serial),
            )
            row = db.execute(
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = %s",  # noqa: S608
                (serial,),
            ).fetchone()
        return IssuedRecord(*row) if row else None

    def revoke_id(
        self, spiffe_id: str, ban: bool = False, until: dt.datetime | None = None
    ) -> list[IssuedRecord]:
        """Revoke every unexpired certificate of `spiffe_id`; the rows revoked by this call,
        oldest first. With `ban`, in the same transaction, refuse new certificates for the
        ID until `unban` (or until `until`).

        Two replicas revoking the same ID at once each get only the rows they revoked
        (UPDATE ... RETURNING: the second waits on the rows and finds them revoked)."""
        now = iso(self.clock())
        with self._tx("revoking an identity") as db:
            if ban:
                db.execute(
                    "INSERT INTO bans (spiffe_id, banned_at, until) VALUES (%s, %s, %s) "
                    "ON CONFLICT (spiffe_id) DO UPDATE "
                    "SET banned_at = EXCLUDED.banned_at, until = EXCLUDED.until",
                    (spiffe_id, now, iso(until) if until else None),
                )
            rows = db.execute(
                f"UPDATE certificates SET revoked_at = %s WHERE spiffe_id = %s "  # noqa: S608
                f"AND not_after > %s AND revoked_at IS NULL RETURNING {_CERT_COLUMNS}",
                (now, spiffe_id, now),
            ).fetchall()
        return sorted((IssuedRecord(*r) for r in rows), key=lambda r: (r.issued_at, r.serial))

    def unban(self, spiffe_id: str) -> bool:
        """Lift the block on new certificates for `spiffe_id`; False if there was none."""
        with self._tx("lifting a block") as db:
            cur = db.execute("DELETE FROM bans WHERE spiffe_id = %s", (spiffe_id,))
        return cur.rowcount > 0

    # -- reads -------------------------------------------------------------------------

    def join_token_status(self, jti: str) -> str:
        """'unused', 'used' or 'unknown'."""
        with self._read("reading a join token") as db:
            row = db.execute("SELECT used_at FROM join_tokens WHERE jti = %s", (jti,)).fetchone()
        if row is None:
            return "unknown"
        return "unused" if row[0] is None else "used"

    def ban_of(self, spiffe_id: str) -> tuple[str, str | None] | None:
        """(banned_at, until) if new certificates for `spiffe_id` are refused now, else None."""
        with self._read("reading a block") as db:
            row = db.execute(
                "SELECT banned_at, until FROM bans "
                "WHERE spiffe_id = %s AND (until IS NULL OR until > %s)",
                (spiffe_id, iso(self.clock())),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def bans(self) -> list[dict[str, Any]]:
        """Identities blocked now: spiffe_id, banned_at, until (None: until unrevoked)."""
        with self._read("reading the blocks") as db:
            rows = db.execute(
                "SELECT spiffe_id, banned_at, until FROM bans "
                "WHERE until IS NULL OR until > %s ORDER BY banned_at",
                (iso(self.clock()),),
            ).fetchall()
        return [{"spiffe_id": r[0], "banned_at": r[1], "until": r[2]} for r in rows]

    def latest_not_after(self, issuers: list[str]) -> str | None:
        """Latest not_after of unexpired, unrevoked workload leaves from these intermediates.

        The CA's own serving certificate is left out: the CA re-issues it itself.
        """
        if not issuers:
            return None
        with self._read("reading the latest expiry") as db:
            row = db.execute(
                "SELECT max(not_after) FROM certificates WHERE issuer = ANY(%s) "
                "AND not_after > %s AND revoked_at IS NULL AND credential != 'ca_server'",
                (list(issuers), iso(self.clock())),
            ).fetchone()
        return row[0] if row else None

    def leaves_in_use(self, issuers: list[str]) -> int:
        """How many unexpired, unrevoked workload leaves these intermediates issued."""
        if not issuers:
            return 0
        with self._read("counting leaves in use") as db:
            row = db.execute(
                "SELECT count(*) FROM certificates WHERE issuer = ANY(%s) "
                "AND not_after > %s AND revoked_at IS NULL AND credential != 'ca_server'",
                (list(issuers), iso(self.clock())),
            ).fetchone()
        return int(row[0]) if row else 0

    def revoked_serials(self) -> list[str]:
        """Serials revoked and not yet expired (what the bundle carries); an index holds
        exactly the revoked rows, so this costs nothing like a scan of every issuance."""
        with self._read("reading revoked serials") as db:
            rows = db.execute(
                "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL "
                "AND not_after > %s ORDER BY serial",
                (iso(self.clock()),),
            ).fetchall()
        return [r[0] for r in rows]

    def certificate(self, serial: str) -> IssuedRecord | None:
        """The ledger row of one serial, or None."""
        with self._read("reading a certificate") as db:
            row = db.execute(
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = %s",  # noqa: S608
                (serial,),
            ).fetchone()
        return IssuedRecord(*row) if row else None

    def certificates(
        self, spiffe_id: str | None = None, active_only: bool = False, limit: int | None = None
    ) -> list[IssuedRecord]:
        """Issued certificates, newest first, optionally filtered."""
        sql = f"SELECT {_CERT_COLUMNS} FROM certificates WHERE true"  # noqa: S608
        args: list[str | int] = []
        if spiffe_id:
            sql += " AND spiffe_id = %s"
            args.append(spiffe_id)
        if active_only:
            sql += " AND not_after > %s"
            args.append(iso(self.clock()))
        sql += " ORDER BY issued_at DESC, serial"
        if limit is not None:
            sql += " LIMIT %s"
            args.append(limit)
        with self._read("listing certificates") as db:
            rows = db.execute(sql, args).fetchall()
        return [IssuedRecord(*r) for r in rows]

    def refusals(self, limit: int = 100) -> list[dict[str, Any]]:
        """Most recent refusals, newest first."""
        with self._read("reading refusals") as db:
            rows = db.execute(
                "SELECT at, spiffe_id, credential, code, reason, peer FROM refusals "
                "ORDER BY id DESC LIMIT %s",
                (limit,),
            ).fetchall()
        cols = ("at", "spiffe_id", "credential", "code", "reason", "peer")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def counts(self) -> dict[str, int]:
        """Totals for `meshca status` (one statement: one consistent snapshot)."""
        with self._read("counting the ledger") as db:
            row = db.execute(
                "SELECT (SELECT count(*) FROM certificates),"
                " (SELECT count(*) FROM certificates WHERE not_after > %(now)s),"
                " (SELECT count(*) FROM refusals),"
                " (SELECT count(*) FROM certificates"
                "   WHERE revoked_at IS NOT NULL AND not_after > %(now)s),"
                " (SELECT count(*) FROM join_tokens),"
                " (SELECT count(*) FROM join_tokens WHERE used_at IS NOT NULL)",
                {"now": iso(self.clock())},
            ).fetchone()
        assert row is not None
        keys = (
            "issued",
            "active",
            "refused",
            "revoked",
            "join_tokens_minted",
            "join_tokens_used",
        )
        return {k: int(v) for k, v in zip(keys, row, strict=True)}
