"""The CA's state on PostgreSQL (meshca.pgstate) against a real server: init, load, rotation
steps from several replicas, the KEK that seals the keys, notifications, the database down."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pgserver import PgServer, pg_server
from pgserver import dsn_fixture as dsn_fixture  # noqa: F401 (the fixture `dsn`)
from pgserver import shared_pg_fixture as shared_pg_fixture  # noqa: F401 (`shared_pg`)

from meshca import pki
from meshca.authority import Authority, ensure_jwt_key, init_ca
from meshca.errors import StateError, Unavailable
from meshca.kek import Kek, load_kek, parse_kek
from meshca.pgstate import PgState
from meshca.rotate import rotate
from meshca.store import JWT_KEY_FILE, TOKEN_KEY_FILE

pytestmark = pytest.mark.e2e


@pytest.fixture
def kek() -> Kek:
    return Kek(os.urandom(32), "test KEK")


@pytest.fixture
def state(dsn: str, kek: Kek) -> Iterator[PgState]:
    st = PgState(dsn, kek, migrate=True)
    try:
        yield st
    finally:
        st.close()


def test_init_then_load_from_another_replica(dsn: str, kek: Kek, state: PgState) -> None:
    made = init_ca(state, "prod.example")
    other = PgState(dsn, kek)
    try:
        authority = Authority.load(other)
        assert authority.trust_domain == "prod.example"
        assert authority.state == made
        assert authority.intermediate_key.public_key() == authority.intermediate.public_key()
        # the signing keys made by init are there too
        assert other.has(TOKEN_KEY_FILE) and other.has(JWT_KEY_FILE)
        assert isinstance(ensure_jwt_key(other), type(authority.intermediate_key))
        assert int(other.revision()) == 1  # type: ignore[call-overload]
    finally:
        other.close()


def test_keys_are_not_readable_from_the_database_without_the_kek(
    dsn: str, kek: Kek, state: PgState, shared_pg: PgServer
) -> None:
    init_ca(state, "cluster.local")
    authority = Authority.load(state)
    der = authority.intermediate_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    raw = authority.intermediate_key.private_numbers().private_value.to_bytes(32, "big")
    with shared_pg.connect() as conn:
        rows = conn.execute("SELECT name, key_sealed FROM ca_material").fetchall()
        dump = b"".join(bytes(r[1]) for r in rows if r[1] is not None)
        dump += str(conn.execute("SELECT doc FROM ca_state").fetchall()).encode()
    assert {r[0] for r in rows if r[1] is not None} >= {"token-signing", "jwt-signing"}
    for secret in (b"PRIVATE KEY", der, raw, base64.b64encode(der)[:40], raw.hex().encode()):
        assert secret not in dump
    assert kek.key not in dump and kek.key.hex().encode() not in dump
    # Another KEK cannot open them, and the error names the KEKs by id, never a key.
    wrong = PgState(dsn, Kek(os.urandom(32), "--kek-file /wrong"))
    try:
        with pytest.raises(StateError) as refused:
            Authority.load(wrong)
        message = str(refused.value)
        assert "another key-encryption key" in message and kek.kek_id in message
        assert "--kek-file /wrong" in message
        assert kek.key.hex() not in message
    finally:
        wrong.close()


def test_a_writer_without_the_kek_cannot_change_the_ca(
    kek: Kek, state: PgState, shared_pg: PgServer
) -> None:
    """Someone who can write to the database but has no KEK can neither swap keys between
    rows, nor add a root of theirs to the bundle, nor point the state at other material."""
    init_ca(state, "cluster.local")
    st = state.read_state()
    good = Authority.load(state)
    tampering = [
        # another row's sealed key in the intermediate's row
        "UPDATE ca_material SET key_sealed = (SELECT key_sealed FROM ca_material "
        f"WHERE name = 'token-signing') WHERE name = '{st.intermediate}'",
        # a root of the attacker's (here: the intermediate's certificate) in the bundle
        "UPDATE ca_state SET doc = replace(doc, '\"roots\": [', "
        f'\'"roots": ["{st.intermediate}", \')',
        # the state's revision moved on without a change (to pass a replica's check)
        "UPDATE ca_state SET revision = revision + 1",
        # a certificate replaced
        f"UPDATE ca_material SET cert_pem = (SELECT cert_pem FROM ca_material WHERE name = "
        f"'{st.intermediate}') WHERE name = '{st.roots[0]}'",
    ]
    with shared_pg.connect() as conn:
        saved = conn.execute("SELECT * FROM ca_state").fetchall()
        material = conn.execute("SELECT name, cert_pem, key_sealed FROM ca_material").fetchall()
    for sql in tampering:
        shared_pg.psql(sql)
        with pytest.raises(StateError, match="does not verify with the key-encryption key"):
            Authority.load(state)
        with shared_pg.connect() as conn:  # put it back as it was
            conn.execute("DELETE FROM ca_state")
            conn.execute("INSERT INTO ca_state VALUES (%s, %s, %s, %s, %s, %s)", saved[0])
            for name, cert_pem, sealed in material:
                conn.execute(
                    "UPDATE ca_material SET cert_pem = %s, key_sealed = %s WHERE name = %s",
                    (cert_pem, sealed, name),
                )
        assert Authority.load(state).state == good.state
    # The sealed keys are bound to their row's name, too.
    blob = kek.seal("issuing-a", b"pem")
    assert kek.open("issuing-a", blob) == b"pem"
    with pytest.raises(StateError, match="does not open with the key-encryption key"):
        kek.open("issuing-b", blob)
    with pytest.raises(StateError, match="is not a sealed key"):
        kek.open("issuing-a", blob[:20])


def test_kek_files(tmp_path: Path) -> None:
    key = os.urandom(32)
    for content in (base64.b64encode(key) + b"\n", key.hex().encode(), key):
        path = tmp_path / "kek"
        path.write_bytes(content)
        assert load_kek(path).key == key
    passphrase = b"correct horse battery staple!!!!"  # 32 characters, not 32 random bytes
    for bad in (b"", b"short", base64.b64encode(os.urandom(16)), b"x" * 44, passphrase):
        with pytest.raises(StateError, match="does not hold a key-encryption key") as e:
            parse_kek(bad, "--kek-file /k")
        assert bad.decode(errors="replace") not in str(e.value) or not bad
    with pytest.raises(StateError, match="no such file"):
        load_kek(tmp_path / "missing")
    assert key.hex() not in repr(load_kek(path))


def test_init_twice_at_once_makes_one_ca(dsn: str, kek: Kek) -> None:
    replicas = [PgState(dsn, kek, migrate=True) for _ in range(3)]
    outcomes: list[object] = []
    start = threading.Barrier(3)

    def run(st: PgState) -> None:
        start.wait(timeout=10)
        try:
            outcomes.append(init_ca(st, "cluster.local"))
        except StateError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        made = [o for o in outcomes if not isinstance(o, StateError)]
        assert len(made) == 1, outcomes
        assert all("already exists" in str(o) for o in outcomes if isinstance(o, StateError))
        assert Authority.load(replicas[2]).state == made[0]
    finally:
        for r in replicas:
            r.close()


def test_a_rotation_through_one_replica_is_seen_by_another(dsn: str, kek: Kek) -> None:
    a, b = PgState(dsn, kek, migrate=True), PgState(dsn, kek)
    try:
        init_ca(a, "cluster.local")
        before = Authority.load(b)
        woke = threading.Event()
        stop = threading.Event()
        listener = threading.Thread(target=b.listen, args=(woke.set, stop), daemon=True)
        listener.start()
        assert woke.wait(5)  # it reports once on (re)connecting
        woke.clear()
        result = rotate(a, force_intermediate=True)
        assert result["action"] == "rotate_intermediate"
        assert woke.wait(5), "no NOTIFY reached the other replica"
        after = Authority.load(b)
        assert pki.serial_hex(after.intermediate) == result["intermediate"]
        assert after.intermediate != before.intermediate
        assert int(b.revision()) == 2  # type: ignore[call-overload]
        stop.set()
        listener.join(5)
    finally:
        a.close()
        b.close()


def test_two_rotations_at_once_end_in_one_consistent_state(dsn: str, kek: Kek) -> None:
    replicas = [PgState(dsn, kek, migrate=True) for _ in range(2)]
    init_ca(replicas[0], "cluster.local")
    results: list[object] = []
    start = threading.Barrier(2)

    def run(st: PgState, flags: dict[str, bool]) -> None:
        start.wait(timeout=10)
        try:
            results.append(rotate(st, **flags))
        except Exception as e:  # noqa: BLE001 (asserted below)
            results.append(e)

    try:
        for flags in ({"start_root_rotation": True}, {"force_intermediate": True}):
            results.clear()
            threads = [threading.Thread(target=run, args=(r, flags)) for r in replicas]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert all(isinstance(r, dict) for r in results), results
        authority = Authority.load(replicas[1])
        st = authority.state
        # One root rotation was started (the second run found it under way), and the
        # intermediate was replaced twice, one run after the other.
        assert len(st.roots) == 2 and st.root_rotation["stage"] == "prepared"
        assert int(replicas[0].revision()) == 4  # type: ignore[call-overload]
        assert authority.intermediate_key.public_key() == authority.intermediate.public_key()
    finally:
        for r in replicas:
            r.close()


def test_changes_need_the_lock_and_it_is_cluster_wide(dsn: str, kek: Kek, state: PgState) -> None:
    init_ca(state, "cluster.local")
    with pytest.raises(StateError, match="under locked"):
        state.write_key("extra.key", b"x")
    other = PgState(dsn, kek)
    try:
        with state.locked():
            with pytest.raises(StateError, match="another meshca is changing"):
                with other.locked(wait=False):
                    pass
        with other.locked(wait=False):  # released with the first's session
            pass
    finally:
        other.close()


def test_the_database_down_is_unavailable_then_recovers(tmp_path: Path, kek: Kek) -> None:
    with pg_server(tmp_path) as server:
        st = PgState(server.dsn, kek, migrate=True, timeout=2)
        try:
            init_ca(st, "cluster.local")
            server.stop("immediate")
            with pytest.raises(Unavailable):
                st.read_state()
            with pytest.raises(Unavailable):
                rotate(st, force_intermediate=True)
            server.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    assert st.read_state().trust_domain == "cluster.local"
                    break
                except Unavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert rotate(st, force_intermediate=True)["action"] == "rotate_intermediate"
        finally:
            st.close()


def test_a_replica_that_missed_the_notification_polls_the_change_in(
    dsn: str, kek: Kek, state: PgState
) -> None:
    """Without its listener (its connection down when the NOTIFY went out), a replica still
    reloads a change made through another within its reload interval."""
    import asyncio

    from meshca.config import build_serve_config
    from meshca.server import CAServer

    init_ca(state, "cluster.local")
    config = build_serve_config("", reload_interval=0.2)
    replica = PgState(dsn, kek)
    ca = CAServer(config, state_store=replica)

    async def run() -> float:
        watcher = asyncio.create_task(ca.watch_state_forever())  # no listener thread
        try:
            before = ca.active
            step = await asyncio.to_thread(rotate, state, force_intermediate=True)
            start = time.monotonic()
            while ca.active is before:
                assert time.monotonic() - start < 5, "the change was not polled in"
                await asyncio.sleep(0.02)
            assert pki.serial_hex(ca.authority.intermediate) == step["intermediate"]
            return time.monotonic() - start
        finally:
            watcher.cancel()
            await ca.close()

    assert asyncio.run(run()) < 2.0


def test_the_jwt_key_of_an_older_ca_is_made_once_and_stored(
    dsn: str, kek: Kek, state: PgState, shared_pg: PgServer
) -> None:
    init_ca(state, "cluster.local")
    shared_pg.psql("DELETE FROM ca_material WHERE name = 'jwt-signing'")  # a CA from before
    made = ensure_jwt_key(state)
    other = PgState(dsn, kek)
    try:
        assert ensure_jwt_key(other).private_numbers() == made.private_numbers()
    finally:
        other.close()
    assert shared_pg.psql("SELECT count(*) FROM ca_material WHERE name = 'jwt-signing'") == "1"
