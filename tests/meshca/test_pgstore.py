"""The CA's ledger on PostgreSQL (meshca/pgstore.py) answers as the SQLite ledger does, so that
CA replicas can share it: the same tests run against both backends; replicas racing for one
join token issue exactly once; migrations are versioned and safe to run at once; a database
that is down is a 503 that records nothing, and the ledger recovers when it is back; the
DSN's password never shows in a message or a log line."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgserver import PgServer, free_port
from pgserver import dsn_fixture as dsn_fixture  # noqa: F401 (the fixture `dsn`)
from pgserver import pg_fixture as pg_fixture  # noqa: F401 (the fixture `pg`)
from pgserver import shared_pg_fixture as shared_pg_fixture  # noqa: F401 (`shared_pg`)

from meshca import pgstore, store
from meshca.errors import StateError, Unavailable
from meshca.pgstore import PgLedger, migrate

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
A = "spiffe://td/ns/a/sa/a"
B = "spiffe://td/ns/b/sa/b"


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


def at(**delta: float) -> str:
    """NOW moved by `delta`, in the ledger's format."""
    return store.iso(NOW + dt.timedelta(**delta))


def rec(
    serial: str = "0a",
    spiffe_id: str = A,
    *,
    issued: str | None = None,
    not_after: str | None = None,
    credential: str = "join_token",
    issuer: str = "01",
) -> store.IssuedRecord:
    return store.IssuedRecord(
        serial,
        spiffe_id,
        at(minutes=-5),
        not_after or at(hours=24),
        issued or at(),
        credential,
        issuer,
        "ff" * 32,
        "10.0.0.1",
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def ledger(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator:
    """The SQLite ledger, then the PostgreSQL one: every test below runs on both."""
    if request.param == "sqlite":
        led = store.Ledger(tmp_path / "ledger.db", clock)
    else:
        led = PgLedger(request.getfixturevalue("dsn"), clock, migrate=True)
    try:
        yield led
    finally:
        led.close()


# -- the same behaviours as the SQLite ledger ----------------------------------------


def test_issuances_are_recorded_and_listed_newest_first(ledger) -> None:
    r1 = rec("01", A, issued=at(hours=-3))
    r2 = rec("02", B, issued=at(hours=-2))
    r3 = rec("03", A, issued=at(hours=-1), not_after=at(minutes=-1))  # expired
    r4 = rec("04", A, issued=at(hours=-1))  # issued with 03: the serial breaks the tie
    for r in (r1, r2, r3, r4):
        ledger.record_issued(r)
    assert ledger.certificate("02") == r2
    assert ledger.certificate("ff") is None
    serials = lambda **kw: [r.serial for r in ledger.certificates(**kw)]  # noqa: E731
    assert serials() == ["03", "04", "02", "01"]
    assert serials(spiffe_id=A) == ["03", "04", "01"]
    assert serials(active_only=True) == ["04", "02", "01"]
    assert serials(limit=2) == ["03", "04"]
    assert serials(spiffe_id=A, active_only=True, limit=1) == ["04"]
    assert ledger.certificates(spiffe_id=B) == [r2]


def test_a_join_token_is_consumed_once_and_a_refused_consume_records_nothing(ledger) -> None:
    ledger.add_join_token("j1", A, NOW + dt.timedelta(minutes=10))
    ledger.add_join_token("j2", A, NOW + dt.timedelta(minutes=10))
    assert ledger.join_token_status("j1") == "unused"
    assert ledger.join_token_status("nope") == "unknown"
    ledger.record_issued(rec("0a"), "j1")
    assert ledger.join_token_status("j1") == "used"
    with pytest.raises(store.TokenAlreadyUsed):
        ledger.record_issued(rec("0b"), "j1")
    with pytest.raises(store.UnknownToken):
        ledger.record_issued(rec("0c"), "never-minted")
    assert ledger.certificate("0b") is None and ledger.certificate("0c") is None
    assert [r.serial for r in ledger.certificates()] == ["0a"]
    assert ledger.join_token_status("j2") == "unused"
    counts = ledger.counts()
    assert (counts["join_tokens_minted"], counts["join_tokens_used"]) == (2, 1)


def test_revoke_serial_is_idempotent_and_takes_colons(ledger, clock: Clock) -> None:
    ledger.record_issued(rec("aabb"))
    first = ledger.revoke_serial("AA:BB")
    assert first is not None and first.serial == "aabb" and first.revoked_at == at()
    clock.advance(minutes=5)
    again = ledger.revoke_serial("aabb")
    assert again == first, "a second revocation keeps the first time"
    assert ledger.certificate("aabb") == first
    assert ledger.revoke_serial("cc:dd") is None


def test_revoke_id_revokes_the_unexpired_certificates_of_one_id(ledger, clock: Clock) -> None:
    ledger.record_issued(rec("01", A, issued=at(hours=-2)))
    ledger.record_issued(rec("02", A, issued=at(hours=-1)))
    ledger.record_issued(rec("03", A, not_after=at(minutes=-1)))  # expired
    ledger.record_issued(rec("04", A))
    ledger.record_issued(rec("05", B))
    ledger.revoke_serial("04")
    clock.advance(minutes=1)
    revoked = ledger.revoke_id(A)
    assert sorted(r.serial for r in revoked) == ["01", "02"]
    assert {r.revoked_at for r in revoked} == {at(minutes=1)}
    assert ledger.certificate("01") in revoked
    assert ledger.certificate("04").revoked_at == at(), "revoked earlier: left as it was"
    assert (
        ledger.certificate("03").revoked_at is None and ledger.certificate("05").revoked_at is None
    )
    assert ledger.bans() == [] and ledger.ban_of(A) is None, "no ban unless asked"
    assert ledger.revoke_id(A) == []


def test_a_ban_blocks_the_id_until_unban_or_until_its_end(ledger, clock: Clock) -> None:
    ledger.record_issued(rec("01", A))
    until = NOW + dt.timedelta(hours=1)
    assert [r.serial for r in ledger.revoke_id(A, ban=True, until=until)] == ["01"]
    assert ledger.ban_of(A) == (at(), at(hours=1))
    clock.advance(minutes=1)
    ledger.revoke_id(B, ban=True)
    assert ledger.bans() == [
        {"spiffe_id": A, "banned_at": at(), "until": at(hours=1)},
        {"spiffe_id": B, "banned_at": at(minutes=1), "until": None},
    ]
    clock.advance(hours=1)
    assert ledger.ban_of(A) is None and [b["spiffe_id"] for b in ledger.bans()] == [B]
    ledger.revoke_id(A, ban=True)  # a new ban replaces the old one
    assert ledger.ban_of(A) == (at(hours=1, minutes=1), None)
    assert ledger.unban(A) is True
    assert ledger.unban(A) is False
    assert ledger.ban_of(A) is None and ledger.ban_of(B) is not None


def test_latest_not_after_and_leaves_in_use_count_unexpired_unrevoked_leaves(ledger) -> None:
    ledger.record_issued(rec("a1", issuer="i1", not_after=at(hours=2)))
    ledger.record_issued(rec("a2", issuer="i1", not_after=at(hours=5)))
    ledger.revoke_serial("a2")
    ledger.record_issued(rec("a3", issuer="i1", not_after=at(minutes=-1)))
    ledger.record_issued(rec("a4", issuer="i1", not_after=at(hours=9), credential="ca_server"))
    ledger.record_issued(rec("b1", issuer="i2", not_after=at(hours=3)))
    assert ledger.latest_not_after(["i1"]) == at(hours=2)
    assert ledger.latest_not_after(["i1", "i2"]) == at(hours=3)
    assert ledger.latest_not_after(["i3"]) is None
    assert ledger.latest_not_after([]) is None
    assert ledger.leaves_in_use(["i1"]) == 1
    assert ledger.leaves_in_use(["i1", "i2"]) == 2
    assert ledger.leaves_in_use(["i3"]) == 0
    assert ledger.leaves_in_use([]) == 0


def test_revoked_serials_leave_out_the_expired(ledger, clock: Clock) -> None:
    ledger.record_issued(rec("0c", not_after=at(hours=1)))
    ledger.record_issued(rec("0a", not_after=at(hours=3)))
    ledger.record_issued(rec("0b", not_after=at(hours=3)))
    ledger.record_issued(rec("0d", not_after=at(hours=3)))  # not revoked
    for serial in ("0c", "0a", "0b"):
        ledger.revoke_serial(serial)
    assert ledger.revoked_serials() == ["0a", "0b", "0c"]
    clock.advance(hours=2)
    assert ledger.revoked_serials() == ["0a", "0b"]


def test_refusals_newest_first(ledger, clock: Clock) -> None:
    for n in range(3):
        ledger.record_refusal(A if n else None, "join_token", f"code{n}", f"reason {n}", None)
        clock.advance(seconds=1)
    assert ledger.refusals() == [
        {
            "at": at(seconds=2 - n),
            "spiffe_id": A if 2 - n else None,
            "credential": "join_token",
            "code": f"code{2 - n}",
            "reason": f"reason {2 - n}",
            "peer": None,
        }
        for n in range(3)
    ]
    assert [r["code"] for r in ledger.refusals(limit=2)] == ["code2", "code1"]
    # whatever a peer sent is recorded (PostgreSQL's text holds no NUL: U+FFFD instead)
    ledger.record_refusal(None, "none", "bad_json", "unknown field 'a\x00b'", "10.0.0.9")
    assert ledger.refusals(limit=1)[0]["reason"].replace("\ufffd", "\x00") == (
        "unknown field 'a\x00b'"
    )


def test_counts(ledger, clock: Clock) -> None:
    ledger.add_join_token("j1", A, NOW + dt.timedelta(minutes=10))
    ledger.add_join_token("j2", A, NOW + dt.timedelta(minutes=10))
    ledger.record_issued(rec("01"), "j1")
    ledger.record_issued(rec("02", not_after=at(hours=1)))
    ledger.record_issued(rec("03", not_after=at(hours=1)))
    ledger.record_issued(rec("04", not_after=at(minutes=-1)))
    ledger.revoke_serial("02")
    ledger.record_refusal(None, "none", "bad_json", "body is not valid JSON", "127.0.0.1")
    ledger.record_event("revoke", {"serial": "02"})
    assert ledger.counts() == {
        "issued": 4,
        "active": 3,
        "refused": 1,
        "revoked": 1,
        "join_tokens_minted": 2,
        "join_tokens_used": 1,
    }
    clock.advance(hours=2)
    assert ledger.counts() == {
        "issued": 4,
        "active": 1,
        "refused": 1,
        "revoked": 0,
        "join_tokens_minted": 2,
        "join_tokens_used": 1,
    }


def a_day_of_work(ledger, clock: Clock) -> list:
    """Writes and reads of every kind; what every read answered, in order."""
    seen: list = []
    ledger.add_join_token("j1", A, NOW + dt.timedelta(minutes=10))
    ledger.record_issued(rec("0a", A, issuer="i1"), "j1")
    for n in range(1, 6):
        clock.advance(minutes=7)
        ledger.record_issued(rec(f"1{n}", B if n % 2 else A, issued=store.iso(clock())))
    ledger.record_issued(rec("ca", "spiffe://td/meshca", credential="ca_server", issuer="i1"))
    seen += [ledger.revoke_serial("0A"), ledger.revoke_serial("0a"), ledger.revoke_serial("99")]
    revoked = ledger.revoke_id(B, ban=True, until=clock() + dt.timedelta(hours=1))
    seen.append(sorted(revoked, key=lambda r: r.serial))
    ledger.record_refusal(B, "mtls", "revoked_identity", "blocked", "10.1.2.3")
    clock.advance(hours=2)
    seen += [ledger.ban_of(B), ledger.bans(), ledger.revoked_serials(), ledger.refusals()]
    seen += [ledger.latest_not_after(["i1", "01"]), ledger.leaves_in_use(["i1", "01"])]
    seen += [ledger.certificates(), ledger.certificate("13"), ledger.counts()]
    seen += [ledger.join_token_status("j1"), ledger.unban(B), ledger.unban(B)]
    return seen


@pytest.mark.e2e
def test_both_backends_answer_alike(tmp_path: Path, dsn: str) -> None:
    sqlite_clock, pg_clock = Clock(), Clock()
    sqlite = store.Ledger(tmp_path / "ledger.db", sqlite_clock)
    pg = PgLedger(dsn, pg_clock, migrate=True)
    try:
        assert a_day_of_work(pg, pg_clock) == a_day_of_work(sqlite, sqlite_clock)
    finally:
        sqlite.close()
        pg.close()


# -- replicas ------------------------------------------------------------------------


@pytest.mark.e2e
def test_replicas_racing_for_one_join_token_issue_exactly_once(dsn: str, shared_pg) -> None:
    """Two CA replicas (two PgLedgers on one database), three threads released at once on
    each of 50 join tokens: one issuance per token, the others are told it is used."""
    tokens, racers = 50, 3
    clock = Clock()
    replicas = [PgLedger(dsn, clock, migrate=True), PgLedger(dsn, clock)]
    try:
        for n in range(tokens):
            replicas[n % 2].add_join_token(f"jti-{n}", A, NOW + dt.timedelta(minutes=10))
        start = threading.Barrier(racers)
        outcomes: dict[int, list[str]] = defaultdict(list)
        failures: list[BaseException] = []

        def race(k: int) -> None:
            ledger = replicas[k % 2]
            for n in range(tokens):
                start.wait(timeout=30)
                try:
                    ledger.record_issued(rec(f"{n:04x}{k:02x}"), f"jti-{n}")
                    outcomes[n].append(f"{n:04x}{k:02x}")
                except store.TokenAlreadyUsed:
                    outcomes[n].append("used")
                except BaseException as e:  # noqa: BLE001 (reported below)
                    failures.append(e)

        threads = [threading.Thread(target=race, args=(k,)) for k in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert failures == []
        winners = {}
        for n in range(tokens):
            won = [o for o in outcomes[n] if o != "used"]
            assert len(won) == 1 and outcomes[n].count("used") == racers - 1, outcomes[n]
            winners[f"jti-{n}"] = won[0]
        assert replicas[1].counts()["issued"] == tokens
        # Each token names the one certificate issued on it, and that row is there.
        used = shared_pg.psql(
            "SELECT t.jti, t.used_serial, c.serial FROM join_tokens t "
            "LEFT JOIN certificates c ON c.serial = t.used_serial"
        )
        assert {row.split("|")[0]: row.split("|")[1:] for row in used.splitlines()} == {
            jti: [serial, serial] for jti, serial in winners.items()
        }
    finally:
        for r in replicas:
            r.close()


# -- migrations ----------------------------------------------------------------------


@pytest.mark.e2e
def test_migrate_makes_the_current_version_from_an_empty_database(dsn: str, shared_pg) -> None:
    assert migrate(dsn) == 2 == pgstore.SCHEMA_VERSION
    assert (
        shared_pg.psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM meshca_schema")
        == "1,2"
    )
    tables = shared_pg.psql(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
        "WHERE schemaname = 'public'"
    )
    assert tables == (
        "bans,ca_material,ca_state,certificates,events,join_tokens,meshca_schema,refusals,replicas"
    )
    indexes = shared_pg.psql(
        "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes "
        "WHERE tablename = 'certificates'"
    )
    assert indexes == (
        "certificates_by_id,certificates_by_issued_at,certificates_by_not_after,"
        "certificates_pkey,certificates_revoked"
    )
    # revoked_serials (every bundle answer) can read the partial index alone
    plan = shared_pg.psql(
        "SET enable_seqscan = off; EXPLAIN SELECT serial FROM certificates "
        f"WHERE revoked_at IS NOT NULL AND not_after > '{at()}' ORDER BY serial"
    )
    assert "certificates_revoked" in plan
    # times are checked to be in the ledger's format, so that text order is time order
    with pytest.raises(Exception, match="meshca_time"):
        shared_pg.psql("INSERT INTO bans VALUES ('x', '2026-11-26 12:00:00+00', NULL)")


@pytest.mark.e2e
def test_migrate_twice_changes_nothing(dsn: str, shared_pg) -> None:
    assert migrate(dsn) == 2
    ledger = PgLedger(dsn)
    ledger.record_issued(rec("0a"))
    assert migrate(dsn) == 2
    assert ledger.certificate("0a") == rec("0a")
    assert shared_pg.psql("SELECT count(*) FROM meshca_schema") == "2"
    ledger.close()


@pytest.mark.e2e
def test_replicas_migrating_at_once_all_succeed(dsn: str, shared_pg) -> None:
    results: list[int | BaseException] = []
    start = threading.Barrier(3)

    def run() -> None:
        start.wait(timeout=10)
        try:
            results.append(migrate(dsn))
        except BaseException as e:  # noqa: BLE001 (asserted below)
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [2, 2, 2]
    assert (
        shared_pg.psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM meshca_schema")
        == "1,2"
    )


@pytest.mark.e2e
def test_a_ledger_refuses_a_database_without_the_schema(dsn: str) -> None:
    with pytest.raises(StateError) as refused:
        PgLedger(dsn)
    message = str(refused.value)
    assert "has no meshca schema" in message and "needs version 2" in message
    assert "run 'meshca migrate'" in message
    migrate(dsn)
    PgLedger(dsn).close()


@pytest.mark.e2e
def test_an_older_schema_is_refused_then_upgraded(dsn: str, shared_pg, monkeypatch) -> None:
    migrate(dsn)
    v3 = ("ALTER TABLE certificates ADD COLUMN note TEXT",)
    monkeypatch.setattr(pgstore, "_MIGRATIONS", (*pgstore._MIGRATIONS, v3))
    monkeypatch.setattr(pgstore, "SCHEMA_VERSION", 3)
    with pytest.raises(StateError, match=r"has schema version 2; .* needs version 3: run 'meshca"):
        PgLedger(dsn)
    assert migrate(dsn) == 3
    assert (
        shared_pg.psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM meshca_schema")
        == "1,2,3"
    )
    PgLedger(dsn).close()


@pytest.mark.e2e
def test_a_newer_schema_is_refused(dsn: str, shared_pg) -> None:
    migrate(dsn)
    shared_pg.psql("INSERT INTO meshca_schema VALUES (7, '2030-01-01T00:00:00.000000Z')")
    for attempt in (migrate, PgLedger):
        with pytest.raises(StateError, match="schema version 7, newer than this meshca knows"):
            attempt(dsn)


# -- the database down ---------------------------------------------------------------


@pytest.mark.e2e
def test_a_database_down_is_unavailable_records_nothing_and_recovers(
    pg: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ledger = PgLedger(pg.dsn, Clock(), migrate=True, timeout=2)
    ledger.add_join_token("j1", A, NOW + dt.timedelta(minutes=10))
    ledger.add_join_token("j2", A, NOW + dt.timedelta(minutes=10))
    messages = [repr(ledger)]

    # Killed in the middle of a transaction (the token's UPDATE made, the INSERT waiting on
    # a lock): nothing of it is left.
    blocker = pg.connect(autocommit=False)
    blocker.execute("LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE")
    failed: list[BaseException] = []

    def issue() -> None:
        try:
            ledger.record_issued(rec("0b"), "j2")
        except BaseException as e:  # noqa: BLE001 (asserted below)
            failed.append(e)

    midway = threading.Thread(target=issue)
    midway.start()
    deadline = time.monotonic() + 10
    while "Lock" not in pg.psql(
        "SELECT coalesce(string_agg(wait_event_type, ','), '') FROM pg_stat_activity "
        "WHERE query LIKE 'INSERT INTO certificates%' AND pid <> pg_backend_pid()"
    ):
        assert time.monotonic() < deadline, "the INSERT never waited on the lock"
        time.sleep(0.02)
    pg.kill()
    midway.join(timeout=10)
    blocker.close()
    assert [type(e) for e in failed] == [Unavailable]
    messages.append(str(failed[0]))

    # Down: a write and a read are 503s, within the pool's timeout.
    for call in (lambda: ledger.record_issued(rec("0a"), "j1"), ledger.counts):
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as down:
            call()
        assert time.monotonic() - t0 < 2 + 1.5
        assert down.value.status == 503
        assert str(down.value) == (
            "the CA cannot reach its database right now; nothing was recorded or issued"
        )
        messages.append(str(down.value))

    # Back: the same ledger works, and neither token was consumed.
    pg.start()
    assert ledger.join_token_status("j1") == "unused"
    assert ledger.join_token_status("j2") == "unused"
    assert ledger.certificates() == []
    ledger.record_issued(rec("0a"), "j1")
    assert ledger.join_token_status("j1") == "used" and ledger.certificate("0a") == rec("0a")

    # A restart between two calls: the pool hands out no connection the server dropped.
    pg.stop()
    pg.start()
    assert ledger.certificate("0a") == rec("0a")

    # Losing the connection during COMMIT is not "nothing was recorded": it is in doubt.
    pg.psql(
        "CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$;"
        "CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON events "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION die()"
    )
    with pytest.raises(Unavailable, match="cannot tell whether this was recorded") as doubt:
        ledger.record_event("init", {})
    messages.append(str(doubt.value))
    assert ledger.counts()["issued"] == 1, "the pool replaced the connection"

    ledger.close()
    assert "127.0.0.1" in caplog.text, "the log says which database"
    for text in (*messages, caplog.text):
        assert pg.password not in text
        assert pg.dsn not in text


@pytest.mark.e2e
def test_the_dsn_and_its_password_never_show(shared_pg, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    password = "Sw0rdf1sh-not-the-password"
    port = shared_pg.port
    wrong = f"postgresql://meshca:{password}@127.0.0.1:{port}/meshca"
    nobody_there = f"postgresql://meshca:{password}@127.0.0.1:{free_port()}/meshca"
    malformed = f"postgresql://meshca:{password}@127.0.0.1:{port}/meshca?{password}=1"
    keywords = f"host=127.0.0.1 password={password} {password}"
    messages = []
    for dsn, error, why in (
        (wrong, Unavailable, "password authentication failed"),
        (nobody_there, Unavailable, "Connection refused"),
        (malformed, StateError, "not a valid connection string"),
        (keywords, StateError, "not a valid connection string"),
    ):
        for attempt in (PgLedger, migrate):
            with pytest.raises(error, match=why) as failed:
                attempt(dsn)
            messages.append(str(failed.value))
    for text in (*messages, caplog.text):
        assert password not in text
