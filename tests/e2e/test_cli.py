"""The meshca command line as an operator uses it: init (and refusing a second init), token,
bundle, status and certs, with clear errors and nothing changed on refusal."""

from __future__ import annotations

import hashlib
import json
import os
import stat

from helpers import curl_enroll, mint_token, openssl_csr, run_meshca


def snapshot(home):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(home.iterdir())
        if p.is_file()
    }


def test_init_creates_private_state(ca_home):
    assert stat.S_IMODE(ca_home.stat().st_mode) == 0o700
    keys = list(ca_home.glob("*.key"))
    assert len(keys) == 4  # root, intermediate, token-signing, jwt-signing
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    doc = json.loads(run_meshca("status", "--home", str(ca_home), "--json").stdout)
    assert doc["trust_domain"] == "cluster.local"
    assert len(doc["roots"]) == 1 and len(doc["roots"][0]["sha256"]) == 64
    assert doc["intermediate"]["not_after"] < doc["roots"][0]["not_after"]
    assert doc["ledger"]["issued"] == 0


def test_second_init_refuses_and_changes_nothing(ca_home):
    before = snapshot(ca_home)
    proc = run_meshca("init", "--home", str(ca_home), check=False)
    assert proc.returncode == 1
    assert "already exists" in proc.stderr and "nothing was changed" in proc.stderr
    assert snapshot(ca_home) == before


def test_init_refuses_a_directory_with_other_files(tmp_path):
    home = tmp_path / "busy"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    proc = run_meshca("init", "--home", str(home), check=False)
    assert proc.returncode == 1 and "not empty" in proc.stderr
    assert [p.name for p in home.iterdir()] == ["notes.txt"]


def test_init_with_bad_trust_domain(tmp_path):
    proc = run_meshca(
        "init", "--home", str(tmp_path / "x"), "--trust-domain", "Bad Domain", check=False
    )
    assert proc.returncode == 1 and "--trust-domain" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_init_custom_trust_domain(tmp_path):
    home = tmp_path / "prod"
    run_meshca("init", "--home", str(home), "--trust-domain", "prod.example.org")
    doc = json.loads(run_meshca("status", "--home", str(home), "--json").stdout)
    assert doc["trust_domain"] == "prod.example.org"
    proc = run_meshca(
        "token", "--home", str(home), "--spiffe-id", "spiffe://cluster.local/ns/a/sa/b", check=False
    )
    assert (
        proc.returncode == 1 and "not a workload ID in trust domain prod.example.org" in proc.stderr
    )


def test_token_errors(ca_home):
    for bad, msg in [
        ("not-an-id", "spiffe://"),
        ("spiffe://cluster.local", "not a workload ID"),
        ("spiffe://cluster.local/ns//sa/x", "empty segments"),
    ]:
        proc = run_meshca("token", "--home", str(ca_home), "--spiffe-id", bad, check=False)
        assert proc.returncode == 1 and msg in proc.stderr and proc.stdout == ""
    proc = run_meshca(
        "token",
        "--home",
        str(ca_home),
        "--spiffe-id",
        "spiffe://cluster.local/ns/a/sa/b",
        "--ttl",
        "999999",
        check=False,
    )
    assert proc.returncode == 1 and "TTL" in proc.stderr


def test_commands_on_a_missing_ca(tmp_path):
    for cmd in ("status", "certs", "bundle", "token"):
        args = [cmd, "--home", str(tmp_path / "none")]
        if cmd == "token":
            args += ["--spiffe-id", "spiffe://cluster.local/ns/a/sa/b"]
        proc = run_meshca(*args, check=False)
        assert proc.returncode == 1 and "no CA in" in proc.stderr, (cmd, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_certs_lists_issuances(tmp_path, ca):
    web = "spiffe://cluster.local/ns/default/sa/web"
    _, csr = openssl_csr(tmp_path, "w")
    status, doc = curl_enroll(ca, csr, mint_token(ca.home, web))
    assert status == 200
    rows = json.loads(
        run_meshca("certs", "--home", str(ca.home), "--json", "--spiffe-id", web).stdout
    )
    assert [(r["serial"], r["credential"]) for r in rows] == [(doc["serial"], "join_token")]
    table = run_meshca("certs", "--home", str(ca.home)).stdout
    assert doc["serial"] in table and web in table
    human = run_meshca("status", "--home", str(ca.home)).stdout
    assert "trust domain:  cluster.local" in human and "1/1 join tokens used" in human


def test_python_m_and_console_script_agree(ca_home):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "meshca")
    a = subprocess.run([script, "bundle", "--home", str(ca_home)], capture_output=True, text=True)
    b = run_meshca("bundle", "--home", str(ca_home))
    assert a.returncode == 0 and a.stdout == b.stdout
    assert a.stdout.startswith("-----BEGIN CERTIFICATE-----")


def test_serve_reports_every_bad_flag_and_binds_nothing(ca_home):
    proc = run_meshca(
        "serve",
        "--home",
        str(ca_home),
        "--listen",
        "nope",
        "--cert-ttl",
        "999999999",
        "--burst",
        "0",
        check=False,
    )
    assert proc.returncode == 1
    for flag in ("--listen", "--cert-ttl", "--burst"):
        assert flag in proc.stderr, proc.stderr
    assert "serving on" not in proc.stdout


def test_serve_on_a_missing_ca(tmp_path):
    proc = run_meshca(
        "serve", "--home", str(tmp_path / "none"), "--listen", "127.0.0.1:0", check=False
    )
    assert proc.returncode == 1 and "no CA in" in proc.stderr
