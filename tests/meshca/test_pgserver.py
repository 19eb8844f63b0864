"""The PostgreSQL harness (tests/pgserver.py) works, so that a failure of the CA's store on
PostgreSQL is never blamed on it: a real server starts, keeps what was committed across a
stop and across a crash, runs beside another, listens on 127.0.0.1 alone, needs the password
in its DSN over TCP, and is gone after the test, also after a failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import psycopg
import pytest
from pgserver import PgServer, pg_server
from pgserver import pg_fixture as pg_fixture  # the fixture `pg`

pytestmark = pytest.mark.e2e


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def test_a_table_written_and_read_with_psycopg_through_the_dsn(pg: PgServer) -> None:
    assert pg.dsn == f"postgresql://meshca:{pg.password}@127.0.0.1:{pg.port}/meshca"
    assert pg.password not in repr(pg)
    with psycopg.connect(pg.dsn) as conn:
        conn.execute("CREATE TABLE certs (serial bigint PRIMARY KEY, spiffe_id text NOT NULL)")
        conn.execute(
            "INSERT INTO certs VALUES (%s, %s)", (1, "spiffe://mesh.test/ns/a/sa/é-unicode")
        )
        conn.commit()
    with psycopg.connect(pg.dsn) as conn:
        rows = conn.execute("SELECT serial, spiffe_id FROM certs").fetchall()
    assert rows == [(1, "spiffe://mesh.test/ns/a/sa/é-unicode")]
    assert pg.psql("SELECT current_database(), current_user") == "meshca|meshca"
    assert pg.psql("SHOW server_encoding") == "UTF8"
    assert int(pg.psql("SHOW max_connections")) >= 200
    assert pg.pid is not None
    if os.geteuid() == 0:  # PostgreSQL refuses root: the harness runs it as another user
        assert uid_of(pg.pid) != 0


def test_stop_and_start_again_on_the_same_port_keeps_the_data(pg: PgServer) -> None:
    pg.psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('before the stop')")
    port = pg.port
    pg.stop()
    assert not pg.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.dsn, connect_timeout=2)
    pg.start()
    assert pg.port == port
    assert pg.psql("SELECT v FROM t") == "before the stop"
    assert "database system was shut down at" in pg.log.read_text()


def test_a_killed_server_recovers_what_was_committed(pg: PgServer) -> None:
    pg.psql("CREATE TABLE t (v text)")
    committed = pg.connect()
    committed.execute("INSERT INTO t VALUES ('committed')")
    in_flight = pg.connect(autocommit=False)
    in_flight.execute("INSERT INTO t VALUES ('never committed')")
    pg.kill()  # SIGKILL to the postmaster: a crash, no shutdown checkpoint
    assert not pg.running
    with pytest.raises(psycopg.OperationalError):
        in_flight.commit()
    committed.close()
    in_flight.close()
    pg.start()
    assert pg.psql("SELECT v FROM t") == "committed"
    assert "automatic recovery in progress" in pg.log.read_text()


def test_two_servers_at_once_each_with_its_own_data(pg: PgServer, tmp_path: Path) -> None:
    with pg_server(tmp_path / "second") as other:
        assert other.port != pg.port
        assert other.datadir != pg.datadir
        pg.psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('first')")
        other.psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('second')")
        assert pg.psql("SELECT v FROM t") == "first"
        assert other.psql("SELECT v FROM t") == "second"


def listeners(port: int) -> list[str]:
    """Local addresses in LISTEN state on `port`, from /proc/net/tcp and tcp6 (hex)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.append(address)
    return found


def other_local_addresses() -> list[str]:
    """127.0.0.2 (loopback, but not the address the server binds) and this machine's other
    IPv4 addresses, as `ip` lists them."""
    addresses = ["127.0.0.2"]
    if shutil.which("ip"):
        out = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10
        ).stdout
        for line in out.splitlines():
            address = line.split()[3].split("/")[0]
            if not address.startswith("127."):
                addresses.append(address)
    return addresses


def test_it_listens_on_127_0_0_1_alone(pg: PgServer) -> None:
    assert listeners(pg.port) == ["0100007F"]  # 127.0.0.1, little-endian hex
    for address in other_local_addresses():
        with pytest.raises(OSError), socket.create_connection((address, pg.port), timeout=2):
            pass


def test_tcp_logins_need_the_password(pg: PgServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(
            host=pg.host, port=pg.port, user=pg.user, dbname=pg.database, password="wrong"
        )


def test_a_server_that_cannot_start_is_reported_with_its_log(pg: PgServer, tmp_path: Path) -> None:
    with pg_server(tmp_path / "second") as other:
        other.stop()
        other.port = pg.port  # taken by `pg`
        with pytest.raises(AssertionError) as failed:
            other.start(timeout=10)
    message = str(failed.value)
    assert "postgres on 127.0.0.1:" in message and "exited with status" in message
    assert "last lines of its log" in message and "Address already in use" in message


def test_everything_is_gone_after_the_test_also_after_a_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="the test failed"):
        with pg_server(tmp_path) as server:
            base, pid = server.base, server.pid
            raise RuntimeError("the test failed")
    assert pid is not None
    assert not base.exists()
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
    assert (tmp_path / "postgres.log").exists()  # kept for a post-mortem


def test_skips_when_postgresql_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pgserver

    monkeypatch.setattr(pgserver, "pg_binaries", lambda: None)
    with pytest.raises(pytest.skip.Exception, match=r"make deps installs it"):
        with pg_server(tmp_path):
            pass
