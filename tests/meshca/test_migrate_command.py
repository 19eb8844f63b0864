"""`meshca migrate` against a real PostgreSQL: the DSN from a flag, a file (a Secret) or an
environment variable; idempotent; safe from several replicas at once; errors never show
the DSN's password."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from pgserver import pg_fixture as pg_fixture  # noqa: F401 (the `pg` fixture)

from meshca.config import ConfigError, store_dsn


def migrate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshca", "migrate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_migrate_creates_the_schema_once_from_any_source(pg, tmp_path):
    first = migrate("--store-env", "MESHCA_STORE", env={"MESHCA_STORE": pg.dsn})
    assert first.returncode == 0, first.stderr
    assert "schema is at version 2" in first.stdout
    assert pg.psql("SELECT max(version) FROM meshca_schema") == "2"
    secret = tmp_path / "dsn"
    secret.write_text(pg.dsn + "\n")  # as a mounted Secret: a trailing newline
    again = migrate("--store-file", str(secret))
    assert again.returncode == 0 and "version 2" in again.stdout, again.stderr
    assert pg.psql("SELECT count(*) FROM meshca_schema") == "2"  # nothing applied twice


def test_replicas_migrating_at_once_all_succeed(pg):
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda _: migrate("--store", pg.dsn), range(3)))
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    assert pg.psql("SELECT count(*) FROM meshca_schema") == "2"


def test_an_unreachable_or_refusing_database_is_an_error_without_the_password(pg):
    wrong = pg.dsn.replace(pg.password, "not-the-password-x9")
    got = migrate("--store", wrong)
    assert got.returncode == 1 and "password authentication failed" in got.stderr, got.stderr
    assert "not-the-password-x9" not in got.stderr + got.stdout
    closed = "postgresql://meshca:hunter2-x9@127.0.0.1:1/meshca"
    got = migrate("--store", closed)
    assert got.returncode == 1 and "cannot" in got.stderr
    assert "hunter2-x9" not in got.stderr + got.stdout


@pytest.mark.parametrize(
    "args,problem",
    [
        ((None, None, None), "give exactly one"),
        (("postgresql://a/b", None, "X"), "give exactly one"),
        (("mysql://a/b", None, None), "--store: must be a postgresql:// URL"),
        ((None, "/nonexistent/dsn", None), "--store-file: cannot read /nonexistent/dsn"),
        ((None, None, "UNSET_VAR"), "--store-env: the environment variable UNSET_VAR is not set"),
    ],
)
def test_store_dsn_problems_name_the_flag(args, problem):
    with pytest.raises(ConfigError, match=problem):
        store_dsn(*args, environ={})


def test_store_dsn_sources():
    assert store_dsn(None, None, "S", environ={"S": " postgresql://a/b\n"}) == "postgresql://a/b"
    assert store_dsn("postgres://a/b", None, None) == "postgres://a/b"
    with pytest.raises(ConfigError) as e:
        store_dsn(None, None, "S", environ={"S": "mysql://user:pw-x9@h/d"})
    assert "pw-x9" not in str(e.value)
