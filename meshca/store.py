"""The CA's state directory: atomic files, the state record, the lock, and the SQLite ledger.

Layout of a home directory (mode 0700):

    state.json           which roots are trusted, which intermediate issues, bundle sequence
    root-<tag>.crt/.key  root certificates and keys (keys 0600)
    issuing-<tag>.crt/.key
    token-signing.key    signs join tokens (0600)
    jwt-signing.key      signs JWT-SVIDs (0600)
    ledger.db            SQLite (WAL): issuances, refusals, join tokens, events
    .lock                flock() held by init (and later rotate), so two runs never interleave

`state.json` is written last and atomically (temp file, fsync, rename, fsync dir):
a directory without it holds no CA, and a half-written one is never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.errors import StateError, Unavailable

log = logging.getLogger("meshca.store")
STATE_FILE = "state.json"
LEDGER_FILE = "ledger.db"
LOCK_FILE = ".lock"
TOKEN_KEY_FILE = "token-signing.key"  # noqa: S105 (a file name, not a secret)
JWT_KEY_FILE = "jwt-signing.key"
STATE_VERSION = 1
# Files only `meshca init` creates; leftovers of an interrupted init may be cleaned up.
_OWN_FILE_RE = re.compile(
    r"^(root-[0-9a-f]+\.(crt|key)|issuing-[0-9a-f]+\.(crt|key)|(token|jwt)-signing\.key"
    r"|ledger\.db(-wal|-shm|-journal)?|\.tmp-.*|\.lock)$"
)
_IGNORED_ENTRIES = {"lost+found"}  # present on fresh ext4 volumes (a PVC)

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """The real clock: an aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime) -> str:
    """Ledger time format: RFC 3339 UTC with microseconds, sortable as text."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def atomic_write(
    path: Path, data: bytes, mode: int = 0o600, replaced: Callable[[], None] | None = None
) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a mix.
    `replaced` is called as soon as the new file is in place (before the directory's fsync)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if replaced is not None:
            replaced()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a new file; FileExistsError if it exists. Durable before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours (O_EXCL), and never complete: not left half-written
        raise


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(home: Path, wait: bool = True) -> Iterator[None]:
    """Hold the home directory's exclusive lock (blocks, or StateError if `wait` is False)."""
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise StateError(f"{home} is locked by another meshca command; try again") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def load_cert(path: Path) -> x509.Certificate:
    """A PEM certificate file; StateError naming the file (never its content) otherwise."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise StateError(f"missing {path}") from None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise StateError(f"{path} is not a PEM certificate") from None


def load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM EC private key; StateError (never the key text) on failure."""
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


class StateStore(Protocol):
    """Where the CA's state record, certificates and private keys live, and how a change to
    them is made: new material is written first (`write_pair`, `write_cert`, `write_key`),
    then `write_state` makes it the CA's state in one step; `abandon` drops what was written
    since the last `write_state` (a step that cannot finish). Changes are made under
    `locked()`. `StateDir` (files in `--home`) implements it; `meshca.pgstate.PgState` (a
    shared PostgreSQL, keys sealed with a KEK) is the other implementation."""

    kind: str  # "directory" or "postgresql"

    def describe(self) -> str: ...
    def exists(self) -> bool: ...
    def read_state(self) -> State: ...
    def revision(self) -> object: ...
    def cert(self, name: str) -> x509.Certificate: ...
    def key(self, name: str) -> ec.EllipticCurvePrivateKey: ...
    def certs(self, kind: str) -> list[x509.Certificate]: ...
    def has(self, filename: str) -> bool: ...
    def write_pair(
        self, name: str, key_pem: bytes, cert_pem: bytes, replace: bool = False
    ) -> object: ...
    def write_cert(self, name: str, cert_pem: bytes, replace: bool = False) -> object: ...
    def write_key(self, filename: str, key_pem: bytes) -> None: ...
    def write_state(self, state: State) -> None: ...
    def abandon(self) -> None: ...
    def locked(self, wait: bool = True) -> contextlib.AbstractContextManager[None]: ...
    def initializing(self) -> contextlib.AbstractContextManager[None]: ...
    def ledger(self, clock: Clock = ...) -> LedgerStore: ...
    def close(self) -> None: ...


def open_state(where: Path | StateStore) -> StateStore:
    """A state store: `where` itself, or the state directory at a path."""
    return StateDir(where) if isinstance(where, Path) else where


def open_store(
    home: Path | None,
    dsn: str | None = None,
    kek_file: Path | None = None,
    clock: Clock = utcnow,
    migrate: bool = False,
) -> StateStore:
    """The state directory `home`, or (with `dsn`) the shared PostgreSQL store whose keys are
    sealed with the KEK in `kek_file`. psycopg is imported only for the latter."""
    if dsn is None:
        if home is None:
            raise StateError("give --home DIR, or a store (--store/--store-file/--store-env)")
        return StateDir(home)
    if kek_file is None:
        raise StateError("--kek-file: required with a PostgreSQL store (it seals the CA keys)")
    from meshca.kek import load_kek
    from meshca.pgstate import PgState

    kek = load_kek(kek_file)
    return PgState(dsn, kek, clock, migrate=migrate)


class StateDir:
    """The CA's state directory (`--home`): the only code that knows its file names and how
    they are written (keys 0600, certificates 0644, new files durable before they are
    named, state.json last and atomically). CA certificates and keys are named by their
    base name (`root-<tag>`, `issuing-<tag>`, `endorse-<tag>-<serial>`)."""

    kind = "directory"

    def __init__(self, home: Path) -> None:
        self.home = home
        self._written: list[Path] = []  # files of the change under way (see `abandon`)

    def __repr__(self) -> str:
        return f"<StateDir {self.home}>"

    def describe(self) -> str:
        """Where the state is, for messages and `meshca status`."""
        return str(self.home)

    def exists(self) -> bool:
        """Does the directory hold a CA (a state.json)?"""
        return (self.home / STATE_FILE).exists()

    def revision(self) -> object:
        """Changes whenever state.json is replaced (its mtime; 0 when unreadable)."""
        try:
            return (self.home / STATE_FILE).stat().st_mtime_ns
        except OSError:
            return 0

    def close(self) -> None:
        """Nothing to release (files are opened per call)."""

    def abandon(self) -> None:
        """Remove the files written since the last `write_state`: a private key that no state
        names is not left lying about (after a crash they are simply unused)."""
        for path in self._written:
            with contextlib.suppress(OSError):
                path.unlink()
        self._written.clear()

    @contextlib.contextmanager
    def initializing(self) -> Iterator[None]:
        """Hold the lock for `meshca init`: refuses (StateError, nothing changed) when the
        directory holds a CA or files of its own; removes leftovers of an interrupted init."""
        home = self.home
        if home.exists() and not home.is_dir():
            raise StateError(f"{home} exists and is not a directory")
        if home.exists():
            check_empty_for_init(home)  # refuse before creating even the lock file
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        with locked(home):
            for leftover in check_empty_for_init(home):
                leftover.unlink()  # an earlier init crashed before writing state.json
            os.chmod(home, 0o700)
            yield

    def cert_path(self, name: str) -> Path:
        """Where the certificate `name` lives."""
        return self.home / f"{name}.crt"

    def key_path(self, name: str) -> Path:
        """Where the private key of `name` lives."""
        return self.home / f"{name}.key"

    def cert(self, name: str) -> x509.Certificate:
        """The certificate `name`; StateError if it is missing or bad."""
        return load_cert(self.cert_path(name))

    def key(self, name: str) -> ec.EllipticCurvePrivateKey:
        """The private key of `name` (a CA certificate's, or a signing key file's)."""
        path = self.home / (name if name.endswith(".key") else f"{name}.key")
        return load_ec_key(path)

    def token_key(self) -> ec.EllipticCurvePrivateKey:
        """The join-token signing key."""
        return load_ec_key(self.home / TOKEN_KEY_FILE)

    def certs(self, kind: str) -> list[x509.Certificate]:
        """Every certificate of a kind (`root`, `issuing`, `endorse`) in the directory."""
        return [load_cert(p) for p in sorted(self.home.glob(f"{kind}-*.crt"))]

    def write_pair(
        self, name: str, key_pem: bytes, cert_pem: bytes, replace: bool = False
    ) -> list[Path]:
        """A new key (0600) and certificate (0644) under `name`, durable; the paths written.

        `replace` removes a leftover of the same name first (an interrupted run)."""
        written = []
        for path, data, mode in (
            (self.key_path(name), key_pem, 0o600),
            (self.cert_path(name), cert_pem, 0o644),
        ):
            if replace and path.exists():
                path.unlink()
            create_exclusive(path, data, mode)
            written.append(path)
            self._written.append(path)
        fsync_dir(self.home)
        return written

    def write_cert(self, name: str, cert_pem: bytes, replace: bool = False) -> Path:
        """A new certificate (0644) under `name`, durable."""
        path = self.cert_path(name)
        if replace and path.exists():
            path.unlink()
        create_exclusive(path, cert_pem, 0o644)
        self._written.append(path)
        fsync_dir(self.home)
        return path

    def write_key(self, filename: str, key_pem: bytes) -> None:
        """A new signing key file (0600), durable."""
        create_exclusive(self.home / filename, key_pem)
        self._written.append(self.home / filename)
        fsync_dir(self.home)

    def has(self, filename: str) -> bool:
        """Is there a file of that name?"""
        return (self.home / filename).exists()

    def read_state(self) -> State:
        """state.json, parsed (StateError naming what is wrong)."""
        return read_state(self.home)

    def write_state(self, state: State) -> None:
        """Replace state.json atomically (the last write of any change)."""
        # The files it names are the CA's from the moment it is in place: `abandon` must not
        # remove them even if what follows (the directory's fsync) fails.
        atomic_write(self.home / STATE_FILE, state.to_json(), 0o644, self._written.clear)

    def ledger(self, clock: Clock = utcnow) -> Ledger:
        """The issuance ledger (open it once per thread)."""
        return Ledger(self.home / LEDGER_FILE, clock)

    def locked(self, wait: bool = True) -> contextlib.AbstractContextManager[None]:
        """The directory's exclusive lock."""
        return locked(self.home, wait)


@dataclass(frozen=True)
class State:
    """What state.json says: the trust domain, trusted roots and the issuing pair."""

    trust_domain: str
    roots: tuple[str, ...]  # base names (root-<tag>) of roots in the bundle
    issuing_root: str
    intermediate: str  # base name (issuing-<tag>)
    sequence: int  # bumps whenever the bundle changes
    created_at: str
    # Root rotation in progress: {"stage": "none"} or {"stage": "prepared"|"activated",
    # "old_root": name, "new_root": name, "since": RFC 3339}.
    rotation: tuple[tuple[str, str], ...] = (("stage", "none"),)
    # Cross-certificates (endorse-<tag>) that vouch for a newer root with an older one's
    # key, published beside the bundle for clients that still trust only the old root.
    endorsements: tuple[str, ...] = ()

    @property
    def root_rotation(self) -> dict[str, str]:
        """The rotation record as a dict."""
        return dict(self.rotation)

    def to_json(self) -> bytes:
        """Serialized form written to state.json."""
        doc = {
            "version": STATE_VERSION,
            "trust_domain": self.trust_domain,
            "roots": list(self.roots),
            "issuing_root": self.issuing_root,
            "intermediate": self.intermediate,
            "sequence": self.sequence,
            "created_at": self.created_at,
            "root_rotation": self.root_rotation,
            "endorsements": list(self.endorsements),
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> State:
        """Parse state.json; StateError naming the field when anything is off."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise StateError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise StateError(f"{where} must hold a JSON object")
        if doc.get("version") != STATE_VERSION:
            raise StateError(f"{where}: unsupported version {doc.get('version')!r}")
        try:
            state = cls(
                trust_domain=str(doc["trust_domain"]),
                roots=tuple(str(r) for r in doc["roots"]),
                issuing_root=str(doc["issuing_root"]),
                intermediate=str(doc["intermediate"]),
                sequence=int(doc["sequence"]),
                created_at=str(doc["created_at"]),
                rotation=tuple(
                    (str(k), str(v))
                    for k, v in dict(doc.get("root_rotation", {"stage": "none"})).items()
                ),
                endorsements=tuple(str(e) for e in _list(doc.get("endorsements", []))),
            )
        except KeyError as e:
            raise StateError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise StateError(f"{where}: bad value: {e}") from None
        if state.issuing_root not in state.roots:
            raise StateError(f"{where}: issuing_root is not one of roots")
        rot = state.root_rotation
        if rot.get("stage") not in ("none", "prepared", "activated"):
            raise StateError(f"{where}: root_rotation.stage must be none, prepared or activated")
        if rot["stage"] != "none" and not {"old_root", "new_root", "since"} <= set(rot):
            raise StateError(f"{where}: root_rotation needs old_root, new_root and since")
        return state


def _list(value: object) -> list:
    if not isinstance(value, list):
        raise TypeError("endorsements must be a list")
    return value


def read_state(home: Path) -> State:
    """Load state.json from `home`, or StateError saying there is no CA there."""
    path = home / STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateError(
            f"no CA in {home} (no {STATE_FILE}); run 'meshca init --home {home}'"
        ) from None
    except PermissionError:
        raise StateError(f"cannot read {path}: permission denied") from None
    return State.from_json(data, str(path))


def check_empty_for_init(home: Path) -> list[Path]:
    """Refuse if `home` holds a CA or foreign files; return leftovers of an interrupted init."""
    if (home / STATE_FILE).exists():
        raise StateError(
            f"a CA already exists in {home}; refusing to overwrite it (nothing was changed)"
        )
    leftovers: list[Path] = []
    foreign: list[Path] = []
    for entry in sorted(home.iterdir()):
        if entry.name in _IGNORED_ENTRIES or entry.name == LOCK_FILE:
            continue
        (leftovers if _OWN_FILE_RE.match(entry.name) else foreign).append(entry)
    if foreign:
        names = ", ".join(p.name for p in foreign[:5])
        raise StateError(
            f"{home} is not empty ({names}); refusing to create a CA there (nothing was changed)"
        )
    return leftovers


_SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    serial      TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    not_before  TEXT NOT NULL,
    not_after   TEXT NOT NULL,
    issued_at   TEXT NOT NULL,
    credential  TEXT NOT NULL,
    issuer      TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    peer        TEXT
);
CREATE INDEX IF NOT EXISTS certificates_by_id ON certificates (spiffe_id);
CREATE INDEX IF NOT EXISTS certificates_by_not_after ON certificates (not_after);
CREATE TABLE IF NOT EXISTS refusals (
    id          INTEGER PRIMARY KEY,
    at          TEXT NOT NULL,
    spiffe_id   TEXT,
    credential  TEXT NOT NULL,
    code        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    peer        TEXT
);
CREATE TABLE IF NOT EXISTS join_tokens (
    jti         TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    minted_at   TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    used_at     TEXT,
    used_serial TEXT
);
CREATE TABLE IF NOT EXISTS bans (
    spiffe_id   TEXT PRIMARY KEY,
    banned_at   TEXT NOT NULL,
    until       TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    at          TEXT NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL
);
"""


class TokenAlreadyUsed(Exception):
    """The join token was consumed by an earlier request (replay)."""


class UnknownToken(Exception):
    """The join token was validly signed but never minted by this CA's ledger."""


@dataclass(frozen=True)
class IssuedRecord:
    """One row of the certificates table."""

    serial: str
    spiffe_id: str
    not_before: str
    not_after: str
    issued_at: str
    credential: str
    issuer: str
    sha256: str
    peer: str | None
    revoked_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The dict `meshca certs --json` prints."""
        return dict(self.__dict__)


class LedgerStore(Protocol):
    """What the CA needs from its record of issuances, refusals, join tokens, revocations
    and blocked identities. `Ledger` (SQLite in the state directory) implements it; a
    shared database for several CA replicas is a second implementation."""

    def record_issued(self, rec: IssuedRecord, token_jti: str | None = None) -> None: ...
    def record_refusal(
        self, spiffe_id: str | None, credential: str, code: str, reason: str, peer: str | None
    ) -> None: ...
    def record_event(self, kind: str, detail: dict[str, Any]) -> None: ...
    def add_join_token(self, jti: str, spiffe_id: str, expires_at: dt.datetime) -> None: ...
    def join_token_status(self, jti: str) -> str: ...
    def revoke_serial(self, serial: str) -> IssuedRecord | None: ...
    def revoke_id(
        self, spiffe_id: str, ban: bool = False, until: dt.datetime | None = None
    ) -> list[IssuedRecord]: ...
    def ban_of(self, spiffe_id: str) -> tuple[str, str | None] | None: ...
    def unban(self, spiffe_id: str) -> bool: ...
    def bans(self) -> list[dict[str, Any]]: ...
    def latest_not_after(self, issuers: list[str]) -> str | None: ...
    def leaves_in_use(self, issuers: list[str]) -> int: ...
    def revoked_serials(self) -> list[str]: ...
    def certificate(self, serial: str) -> IssuedRecord | None: ...
    def certificates(
        self, spiffe_id: str | None = None, active_only: bool = False, limit: int | None = None
    ) -> list[IssuedRecord]: ...
    def refusals(self, limit: int = 100) -> list[dict[str, Any]]: ...
    def counts(self) -> dict[str, int]: ...
    def close(self) -> None: ...


class Ledger:
    """The SQLite issuance ledger. One instance per thread; every write is one transaction.

    WAL with synchronous=FULL: a committed issuance or token use survives a crash
    or power loss (about 0.15 ms a commit here, see docs/ca.md).
    """

    def __init__(self, path: Path, clock: Clock = utcnow) -> None:
        self.path = path
        self.clock = clock
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._tx() as db:
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                db.execute(stmt)
            columns = {row[1] for row in db.execute("PRAGMA table_info(certificates)")}
            if "revoked_at" not in columns:  # ledgers made before revocation existed
                db.execute("ALTER TABLE certificates ADD COLUMN revoked_at TEXT")
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a write the database cannot make (a full disk, an I/O error)
        rolls back whole and becomes Unavailable (503): nothing is half-recorded."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            with contextlib.suppress(sqlite3.Error):
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            log.error("ledger write failed (%s): %s", self.path, e)
            raise Unavailable(
                "the CA cannot write its ledger right now; nothing was recorded or issued"
            ) from None

    def record_issued(self, rec: IssuedRecord, token_jti: str | None = None) -> None:
        """Record an issuance; when `token_jti` is given, consume that join token atomically.

        Raises TokenAlreadyUsed / UnknownToken (and records nothing) if the token
        cannot be consumed, so a certificate is never handed out on a replayed token.
        """
        with self._tx() as db:
            if token_jti is not None:
                cur = db.execute(
                    "UPDATE join_tokens SET used_at = ?, used_serial = ? "
                    "WHERE jti = ? AND used_at IS NULL",
                    (rec.issued_at, rec.serial, token_jti),
                )
                if cur.rowcount != 1:
                    row = db.execute(
                        "SELECT used_at FROM join_tokens WHERE jti = ?", (token_jti,)
                    ).fetchone()
                    raise UnknownToken() if row is None else TokenAlreadyUsed()
            db.execute(
                "INSERT INTO certificates (serial, spiffe_id, not_before, not_after, issued_at,"
                " credential, issuer, sha256, peer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        """Record a refused request."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO refusals (at, spiffe_id, credential, code, reason, peer) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (iso(self.clock()), spiffe_id, credential, code, reason, peer),
            )

    def record_event(self, kind: str, detail: dict[str, Any]) -> None:
        """Record an administrative event (init, token minted, ...)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)",
                (iso(self.clock()), kind, json.dumps(detail, sort_keys=True)),
            )

    def add_join_token(self, jti: str, spiffe_id: str, expires_at: dt.datetime) -> None:
        """Record a newly minted join token (never the token itself, only its id)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO join_tokens (jti, spiffe_id, minted_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (jti, spiffe_id, iso(self.clock()), iso(expires_at)),
            )

    def join_token_status(self, jti: str) -> str:
        """'unused', 'used' or 'unknown'."""
        row = self._db.execute("SELECT used_at FROM join_tokens WHERE jti = ?", (jti,)).fetchone()
        if row is None:
            return "unknown"
        return "unused" if row[0] is None else "used"

    def revoke_serial(self, serial: str) -> IssuedRecord | None:
        """Mark one certificate revoked (idempotent); None if the ledger has no such serial."""
        serial = serial.lower().replace(":", "")
        with self._tx() as db:
            db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                (iso(self.clock()), serial),
            )
            row = db.execute("SELECT * FROM certificates WHERE serial = ?", (serial,)).fetchone()
        return IssuedRecord(*row) if row else None

    def revoke_id(
        self, spiffe_id: str, ban: bool = False, until: dt.datetime | None = None
    ) -> list[IssuedRecord]:
        """Revoke every unexpired certificate of `spiffe_id`; the rows revoked by this call.

        With `ban`, in the same transaction, refuse new certificates for the ID until
        `unban` (or until `until`)."""
        now = iso(self.clock())
        with self._tx() as db:
            if ban:
                db.execute(
                    "INSERT OR REPLACE INTO bans (spiffe_id, banned_at, until) VALUES (?, ?, ?)",
                    (spiffe_id, now, iso(until) if until else None),
                )
            rows = db.execute(
                "SELECT * FROM certificates WHERE spiffe_id = ? AND not_after > ? "
                "AND revoked_at IS NULL",
                (spiffe_id, now),
            ).fetchall()
            db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE spiffe_id = ? AND not_after > ? "
                "AND revoked_at IS NULL",
                (now, spiffe_id, now),
            )
        return [dataclasses.replace(IssuedRecord(*r), revoked_at=now) for r in rows]

    def ban_of(self, spiffe_id: str) -> tuple[str, str | None] | None:
        """(banned_at, until) if new certificates for `spiffe_id` are refused now, else None."""
        row = self._db.execute(
            "SELECT banned_at, until FROM bans "
            "WHERE spiffe_id = ? AND (until IS NULL OR until > ?)",
            (spiffe_id, iso(self.clock())),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def unban(self, spiffe_id: str) -> bool:
        """Lift the block on new certificates for `spiffe_id`; False if there was none."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM bans WHERE spiffe_id = ?", (spiffe_id,))
        return cur.rowcount > 0

    def bans(self) -> list[dict[str, Any]]:
        """Identities blocked now: spiffe_id, banned_at, until (None: until unrevoked)."""
        rows = self._db.execute(
            "SELECT spiffe_id, banned_at, until FROM bans WHERE until IS NULL OR until > ? "
            "ORDER BY banned_at",
            (iso(self.clock()),),
        ).fetchall()
        return [{"spiffe_id": r[0], "banned_at": r[1], "until": r[2]} for r in rows]

    def latest_not_after(self, issuers: list[str]) -> str | None:
        """Latest not_after of unexpired, unrevoked workload leaves from these intermediates.

        The CA's own serving certificate is left out: the CA re-issues it itself.
        """
        if not issuers:
            return None
        marks = ",".join("?" * len(issuers))
        row = self._db.execute(
            f"SELECT MAX(not_after) FROM certificates WHERE issuer IN ({marks}) "  # noqa: S608
            "AND not_after > ? AND revoked_at IS NULL AND credential != 'ca_server'",
            (*issuers, iso(self.clock())),
        ).fetchone()
        return row[0] if row else None

    def leaves_in_use(self, issuers: list[str]) -> int:
        """How many unexpired, unrevoked workload leaves these intermediates issued."""
        if not issuers:
            return 0
        marks = ",".join("?" * len(issuers))
        row = self._db.execute(
            f"SELECT COUNT(*) FROM certificates WHERE issuer IN ({marks}) "  # noqa: S608
            "AND not_after > ? AND revoked_at IS NULL AND credential != 'ca_server'",
            (*issuers, iso(self.clock())),
        ).fetchone()
        return int(row[0]) if row else 0

    def revoked_serials(self) -> list[str]:
        """Serials revoked and not yet expired (what the bundle carries)."""
        cur = self._db.execute(
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND not_after > ? "
            "ORDER BY serial",
            (iso(self.clock()),),
        )
        return [r[0] for r in cur]

    def certificate(self, serial: str) -> IssuedRecord | None:
        """The ledger row of one serial, or None."""
        row = self._db.execute("SELECT * FROM certificates WHERE serial = ?", (serial,)).fetchone()
        return IssuedRecord(*row) if row else None

    def certificates(
        self, spiffe_id: str | None = None, active_only: bool = False, limit: int | None = None
    ) -> list[IssuedRecord]:
        """Issued certificates, newest first, optionally filtered."""
        sql, args = "SELECT * FROM certificates WHERE 1=1", list[str | int]()
        if spiffe_id:
            sql += " AND spiffe_id = ?"
            args.append(spiffe_id)
        if active_only:
            sql += " AND not_after > ?"
            args.append(iso(self.clock()))
        sql += " ORDER BY issued_at DESC, serial"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [IssuedRecord(*r) for r in self._db.execute(sql, args)]

    def refusals(self, limit: int = 100) -> list[dict[str, Any]]:
        """Most recent refusals, newest first."""
        cur = self._db.execute(
            "SELECT at, spiffe_id, credential, code, reason, peer FROM refusals "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur]

    def counts(self) -> dict[str, int]:
        """Totals for `meshca status`."""
        now = iso(self.clock())
        one = self._db.execute
        return {
            "issued": one("SELECT COUNT(*) FROM certificates").fetchone()[0],
            "active": one(
                "SELECT COUNT(*) FROM certificates WHERE not_after > ?", (now,)
            ).fetchone()[0],
            "refused": one("SELECT COUNT(*) FROM refusals").fetchone()[0],
            "revoked": one(
                "SELECT COUNT(*) FROM certificates WHERE revoked_at IS NOT NULL AND not_after > ?",
                (now,),
            ).fetchone()[0],
            "join_tokens_minted": one("SELECT COUNT(*) FROM join_tokens").fetchone()[0],
            "join_tokens_used": one(
                "SELECT COUNT(*) FROM join_tokens WHERE used_at IS NOT NULL"
            ).fetchone()[0],
        }
