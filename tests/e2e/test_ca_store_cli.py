"""The meshca commands on a PostgreSQL store, as an operator types them: init, token, certs,
revoke, bundle, status; and every way a start can go wrong (no KEK, the wrong KEK, an
unreadable DSN file, an old schema, the database down) is a clear error naming what is
wrong, with no traceback and no password."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pgserver import PgServer
from pgserver import pg_fixture as pg_fixture  # noqa: F401 (the fixture `pg`)

pytestmark = pytest.mark.e2e

ENV = "MESHCA_TEST_STORE"
WEB = "spiffe://cluster.local/ns/default/sa/web"


def meshca(pg: PgServer, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshca", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, ENV: pg.dsn},
    )


def kek(tmp_path: Path, name: str = "kek") -> Path:
    path = tmp_path / name
    path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    return path


def clean_error(pg: PgServer, proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode != 0, proc.stdout
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert pg.password not in proc.stderr + proc.stdout


def test_the_commands_work_on_a_store(pg: PgServer, tmp_path: Path) -> None:
    k = kek(tmp_path)
    store = ["--store-env", ENV, "--kek-file", str(k)]
    made = meshca(pg, "init", *store, "--trust-domain", "cluster.local")
    assert made.returncode == 0, made.stderr
    assert "created CA for trust domain cluster.local in postgresql://127.0.0.1:" in made.stdout
    clean_error(pg, meshca(pg, "init", *store), "a CA already exists in postgresql://")
    token = meshca(pg, "token", *store, "--spiffe-id", WEB)
    assert token.returncode == 0 and token.stdout.count(".") == 2, token.stderr
    assert pg.psql("SELECT count(*) FROM join_tokens") == "1"
    bundle = meshca(pg, "bundle", *store)
    assert bundle.returncode == 0 and bundle.stdout.count("BEGIN CERTIFICATE") == 1
    step = meshca(pg, "rotate", *store, "--force-intermediate", "--json")
    assert step.returncode == 0 and '"rotate_intermediate"' in step.stdout, step.stderr
    assert pg.psql("SELECT revision FROM ca_state") == "2"
    status = meshca(pg, "status", *store)
    assert status.returncode == 0, status.stderr
    assert "store:         postgresql://127.0.0.1:" in status.stdout
    assert "schema version 2, state revision 2" in status.stdout
    assert pg.password not in status.stdout
    revoke = meshca(pg, "revoke", *store, "--spiffe-id", WEB, "--json")
    assert revoke.returncode == 0, revoke.stderr
    assert pg.psql("SELECT count(*) FROM bans") == "1"
    certs = meshca(pg, "certs", *store, "--json")
    assert certs.returncode == 0 and certs.stdout.strip() == "[]", certs.stderr


def test_a_start_that_cannot_work_says_why(pg: PgServer, tmp_path: Path) -> None:
    k = kek(tmp_path)
    serve = ["serve", "--listen", "127.0.0.1:0"]
    # No schema yet, and no --migrate: run `meshca migrate` first.
    clean_error(
        pg,
        meshca(pg, *serve, "--store-env", ENV, "--kek-file", str(k)),
        "has no meshca schema",
        "run 'meshca migrate'",
    )
    assert meshca(pg, "init", "--store-env", ENV, "--kek-file", str(k)).returncode == 0
    clean_error(pg, meshca(pg, *serve, "--store-env", ENV), "--kek-file: required")
    clean_error(
        pg,
        meshca(pg, *serve, "--store-file", str(tmp_path / "nope"), "--kek-file", str(k)),
        "--store-file: cannot read",
    )
    clean_error(
        pg,
        meshca(pg, *serve, "--store-env", ENV, "--kek-file", str(tmp_path / "nope")),
        "--kek-file: no such file",
    )
    (tmp_path / "short").write_text("c2hvcnQ=\n")
    clean_error(
        pg,
        meshca(pg, *serve, "--store-env", ENV, "--kek-file", str(tmp_path / "short")),
        "does not hold a key-encryption key",
    )
    wrong = kek(tmp_path, "other")
    proc = meshca(pg, *serve, "--store-env", ENV, "--kek-file", str(wrong))
    clean_error(pg, proc, "sealed with another key-encryption key", str(wrong))
    assert k.read_text().strip() not in proc.stderr
    clean_error(pg, meshca(pg, "status"), "give --home DIR, or --store")
    clean_error(pg, meshca(pg, *serve, "--home", str(tmp_path), "--kek-file", str(k)),
                "--kek-file: goes with --store")  # fmt: skip
    pg.stop()
    clean_error(
        pg,
        meshca(pg, *serve, "--store-env", ENV, "--kek-file", str(k)),
        "cannot reach",
    )


def test_rekey_reseals_the_keys_with_a_new_kek(pg: PgServer, tmp_path: Path) -> None:
    old, new = kek(tmp_path, "old"), kek(tmp_path, "new")
    with_old = ["--store-env", ENV, "--kek-file", str(old)]
    with_new = ["--store-env", ENV, "--kek-file", str(new)]
    assert meshca(pg, "init", *with_old).returncode == 0
    before = meshca(pg, "bundle", *with_old).stdout
    sealed_before = pg.psql("SELECT string_agg(encode(key_sealed, 'hex'), ',') FROM ca_material")
    clean_error(pg, meshca(pg, "rekey", *with_old, "--new-kek-file", str(old)),
                "it is the KEK the keys are sealed with now")  # fmt: skip
    done = meshca(pg, "rekey", *with_old, "--new-kek-file", str(new))
    assert done.returncode == 0, done.stderr
    assert "4 keys" in done.stdout and "re-sealed" in done.stdout
    assert pg.psql("SELECT revision FROM ca_state") == "2"
    sealed_after = pg.psql("SELECT string_agg(encode(key_sealed, 'hex'), ',') FROM ca_material")
    assert set(sealed_before.split(",")).isdisjoint(sealed_after.split(","))
    # The same CA under the new KEK; the old one no longer opens it.
    assert meshca(pg, "bundle", *with_new).stdout == before
    step = meshca(pg, "rotate", *with_new, "--force-intermediate", "--json")
    assert step.returncode == 0, step.stderr
    clean_error(pg, meshca(pg, "bundle", *with_old), "sealed with another key-encryption key")
    clean_error(pg, meshca(pg, "rotate", *with_old, "--force-intermediate"),
                "sealed with another key-encryption key")  # fmt: skip
    clean_error(pg, meshca(pg, "rekey", "--home", str(tmp_path), "--new-kek-file", str(new)),
                "rekey works on a PostgreSQL store")  # fmt: skip
