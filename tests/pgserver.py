"""A real PostgreSQL for tests: initdb and a postmaster of their own on a free loopback port,
stopped (also on failure) and removed afterwards (Debian's postgresql, installed by `make deps`).

The data directory lives in a fresh directory under /tmp, not in the test's `tmp_path`: as
root the server must run as an unprivileged user (PostgreSQL refuses root), and that user
cannot enter /tmp/pytest-of-root (mode 0700). The server's log is written to `tmp_path`
through a descriptor we open, so it stays there for a post-mortem after the data is gone.

The postmaster is our own child (started directly, not through `pg_ctl`), so that `kill()`
hits exactly it and the signals `pg_ctl stop -m smart|fast|immediate` would send are ours to
send: SIGTERM, SIGINT, SIGQUIT.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers import free_port, tail

if TYPE_CHECKING:
    import psycopg

SKIP_REASON = "PostgreSQL is not installed (make deps installs it)"
DEBIAN_ROOT = Path("/usr/lib/postgresql")
USER = "meshca"  # the database superuser initdb creates, whoever the server runs as
DATABASE = "meshca"
# Unprivileged system users to run the server as when the tests run as root: the one the
# Debian package creates, else the one every system has.
RUN_AS = ("postgres", "nobody")
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


@dataclass(frozen=True)
class PgBinaries:
    initdb: str
    pg_ctl: str
    postgres: str


def _version_key(folder: Path) -> tuple[int, ...]:
    """'9.6' -> (9, 6), '16' -> (16,); anything else sorts first."""
    return tuple(int(part) for part in re.findall(r"\d+", folder.name)) or (-1,)


def pg_binaries() -> PgBinaries | None:
    """initdb, pg_ctl and postgres of the newest /usr/lib/postgresql/<version>/bin (where
    Debian puts them, off PATH), else from PATH; None when any is missing."""
    names = ("initdb", "pg_ctl", "postgres")
    folders = sorted(DEBIAN_ROOT.glob("*/bin"), key=lambda b: _version_key(b.parent))
    for folder in reversed(folders):
        if all(os.access(folder / name, os.X_OK) for name in names):
            return PgBinaries(*(str(folder / name) for name in names))
    initdb, pg_ctl, postgres = (shutil.which(name) for name in names)
    if initdb and pg_ctl and postgres:
        return PgBinaries(initdb, pg_ctl, postgres)
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run initdb and the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in RUN_AS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise AssertionError(f"running as root, and none of the users {RUN_AS} exists to run postgres")


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def _server_processes(datadir: Path, postmaster: int) -> set[int]:
    """The live processes of the server on `datadir`: the postmaster's children, and every
    process working in `datadir` (every postgres process does; this finds them still, once
    a killed postmaster's children have another parent)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(entry.name)
        if stat is None or stat[0] == "Z":  # a zombie has exited (and let go of the memory)
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = None
        if stat[1] == postmaster or cwd == str(datadir):
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    stat = _stat(str(pid))
    return stat is not None and stat[0] != "Z"


class PgServer:
    """A PostgreSQL postmaster on 127.0.0.1:`port`, its data in `datadir`, logging to `log`;
    the database `meshca` belongs to the superuser `meshca`, who logs in over TCP with a
    password generated for this server (in `dsn`, never in the repr)."""

    host = "127.0.0.1"
    user = USER
    database = DATABASE

    def __init__(
        self,
        binaries: PgBinaries,
        base: Path,
        log: Path,
        run_as: pwd.struct_passwd | None,
        durable: bool = False,
    ) -> None:
        self.binaries = binaries
        self.base = base  # ours: the data directory and the unix socket live here
        self.datadir = base / "data"
        self.log = log
        self.run_as = run_as
        self.port = 0
        self.password = secrets.token_urlsafe(18)  # URL-safe: goes into the DSN as it is
        self.proc: subprocess.Popen | None = None
        # fsync and full_page_writes as in production (benchmarks), or off (tests: speed)
        self.durable = durable

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PgServer {self.host}:{self.port} {state} data={self.datadir}>"

    @property
    def dsn(self) -> str:
        """`postgresql://meshca:PASSWORD@127.0.0.1:PORT/meshca`, as `--store` takes it."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self.proc.pid if self.running and self.proc is not None else None

    def log_tail(self) -> str:
        return tail(self.log.read_text(errors="replace") if self.log.exists() else None)

    # -- processes -------------------------------------------------------------------

    def _command(self, *args: str) -> list[str]:
        if self.run_as is None:
            return list(args)
        return [
            "setpriv",
            f"--reuid={self.run_as.pw_uid}",
            f"--regid={self.run_as.pw_gid}",
            "--init-groups",
            "--",
            *args,
        ]

    @staticmethod
    def _env() -> dict[str, str]:
        # Our PG* variables (PGDATA, PGPORT, PGOPTIONS...) are not the test server's business.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return env

    def _chown(self, path: Path) -> None:
        if self.run_as is not None:
            os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    def initdb(self, timeout: float = 30) -> None:
        """A new cluster in `datadir`: UTF8, no locale; trust on the unix socket (ours
        alone, in `base`), the password on TCP."""
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        cmd = self._command(
            self.binaries.initdb,
            f"--pgdata={self.datadir}",
            f"--username={self.user}",
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",  # a test cluster need not survive a power cut
            "--no-instructions",
        )
        try:
            with self.log.open("ab") as out:
                done = subprocess.run(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.base,
                    env=self._env(),
                    timeout=timeout,
                )
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"initdb did not finish within {timeout:g} s\n"
                f"--- last lines of its log ({self.log}):\n{self.log_tail()}"
            ) from None
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise AssertionError(
                f"initdb failed with status {done.returncode}\n"
                f"--- last lines of its log ({self.log}):\n{self.log_tail()}"
            )

    def start(self, timeout: float = 30) -> None:
        """Start the postmaster on `port` (again, after a stop or a kill: same port, same
        data, crash recovery if it was killed) and wait until it accepts connections."""
        if self.running:
            raise AssertionError(f"{self!r} is already running")
        with self.log.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self._command(
                    self.binaries.postgres,
                    "-D", str(self.datadir),
                    "-p", str(self.port),
                    "-c", f"listen_addresses={self.host}",  # nothing but loopback
                    "-c", f"unix_socket_directories={self.base}",
                    "-c", "max_connections=200",
                    # Speed: a test needs no durability against a power cut (a benchmark
                    # asks for it: `durable`). Commits stay synchronous, though: with
                    # synchronous_commit=off a commit returns before its WAL reaches the
                    # kernel, and kill() would lose it.
                    "-c", f"fsync={'on' if self.durable else 'off'}",
                    "-c", f"full_page_writes={'on' if self.durable else 'off'}",
                    "-c", "log_line_prefix=%m [%p] %q%u@%d ",
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                env=self._env(),
                start_new_session=True,  # a ^C at the terminal is for pytest, not for it
            )  # fmt: skip
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                self.connect(dbname="postgres", connect_timeout=2).close()
                return
            except psycopg.OperationalError as e:  # starting up, or not listening yet
                last = e
            time.sleep(0.05)
        if self.proc.poll() is not None:
            why = f"exited with status {self.proc.returncode}"
        else:
            why = f"did not accept connections within {timeout:g} s (last error: {last})"
            self._halt(signal.SIGQUIT)
        raise AssertionError(
            f"postgres on {self.host}:{self.port} {why}\n"
            f"--- last lines of its log ({self.log}):\n{self.log_tail()}"
        )

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Shut down as `pg_ctl stop -m MODE` would (smart: wait for clients; fast: end
        their sessions, checkpoint; immediate: no checkpoint, recovery at the next start);
        SIGKILL if it has not exited within `timeout` s."""
        self._halt(STOP_SIGNALS[mode], timeout)

    def kill(self, timeout: float = 10) -> None:
        """SIGKILL the postmaster, as a crash would; then wait until its backends and
        workers have noticed and exited (SIGKILL those that have not within `timeout` s),
        since a new postmaster refuses to start while they hold the shared memory."""
        self._halt(signal.SIGKILL, timeout)

    def _halt(self, sig: int, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pid = self.proc.pid
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # After a shutdown none are left; after a SIGKILL they notice and exit on their own.
        deadline = time.monotonic() + timeout
        while (left := _server_processes(self.datadir, pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        for child in left:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(_alive(child) for child in left) and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- clients -------------------------------------------------------------------

    def connect(self, dbname: str = DATABASE, **kwargs: Any) -> psycopg.Connection:
        """A psycopg connection over TCP as `meshca` (autocommit unless told otherwise)."""
        import psycopg

        kwargs.setdefault("autocommit", True)
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname,
            sslmode="disable",
            **kwargs,
        )

    def psql(self, sql: str, dbname: str = DATABASE) -> str:
        """Run `sql` (one statement or several, no parameters) in autocommit and return what
        `psql -At` would print for the last one: rows of `|`-separated values, NULL as an
        empty string; a statement without rows gives its command tag (`INSERT 0 1`)."""
        with self.connect(dbname=dbname) as conn, conn.cursor() as cur:
            cur.execute(sql.encode())  # bytes: sent as it is, `%` included
            while cur.nextset():  # several statements: the cursor starts at the first result
                pass
            if cur.description is None:
                return cur.statusmessage or ""
            return "\n".join(
                "|".join("" if v is None else str(v) for v in row) for row in cur.fetchall()
            )


def _log_path(tmp_path: Path) -> Path:
    """tmp_path/postgres.log, or postgres-2.log... when a test starts several servers."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        log = tmp_path / ("postgres.log" if n == 1 else f"postgres-{n}.log")
        try:
            log.touch(exist_ok=False)
            return log
        except FileExistsError:
            continue
    raise AssertionError(f"no free name for a postgres log in {tmp_path}")


@contextmanager
def pg_server(tmp_path: Path, timeout: float = 30, durable: bool = False) -> Iterator[PgServer]:
    """A new PostgreSQL cluster on a free loopback port with the database `meshca`, ready for
    connections; stopped and its data removed on exit (also when the body fails), its log
    left in `tmp_path`. Skips the test when PostgreSQL is not installed. `durable`: fsync
    and full_page_writes on, as in production (for benchmarks)."""
    binaries = pg_binaries()
    if binaries is None:
        pytest.skip(SKIP_REASON)
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e .)")
    run_as = _run_as()
    # Short (the unix socket path must fit in 107 bytes) and enterable by `run_as`.
    base = Path(tempfile.mkdtemp(prefix="meshca-pg-", dir="/tmp"))
    server = PgServer(binaries, base, _log_path(tmp_path), run_as, durable)
    try:
        server._chown(base)
        server.initdb(timeout)
        for attempt in range(3):  # the port may be taken between our look and its bind
            server.port = free_port()
            try:
                server.start(timeout)
                break
            except AssertionError as e:
                if attempt == 2 or "already in use" not in str(e):
                    raise
        server.psql(f"CREATE DATABASE {DATABASE}", dbname="postgres")
        yield server
    finally:
        server.stop("immediate", timeout=10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="pg")
def pg_fixture(tmp_path: Path) -> Iterator[PgServer]:
    """A running PostgreSQL with an empty database `meshca` (`pg.dsn`), gone after the test."""
    with pg_server(tmp_path) as server:
        yield server


@pytest.fixture(name="shared_pg", scope="module")
def shared_pg_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """One server for a test module (a start costs a second): use `dsn` for an empty database
    per test. Started again if a test left it stopped."""
    with pg_server(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture(name="dsn")
def dsn_fixture(shared_pg: PgServer) -> str:
    """The module server's DSN, its database emptied of what an earlier test made."""
    if not shared_pg.running:
        shared_pg.start()
    shared_pg.psql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return shared_pg.dsn
