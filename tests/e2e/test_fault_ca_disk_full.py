"""The CA's disk fills up (its home on a small tmpfs): enrollment is refused with a clear 503
and hands out nothing, a join token refused that way is not spent, a rotation refuses and
changes nothing, the CA keeps serving; when space returns, everything works again."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import curl, curl_enroll, ledger_certs, mint_token, openssl_csr, run_meshca, start_ca

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a small tmpfs for the CA's home needs root"
)


@pytest.fixture
def small_home(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt / "ca"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(where) -> None:
    """Write a file until the file system has no byte left."""
    fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)


def test_a_full_disk_refuses_cleanly_and_recovers(tmp_path, small_home):
    run_meshca("init", "--home", str(small_home))
    ca = start_ca(small_home)
    try:
        web = "spiffe://cluster.local/ns/shop/sa/web"
        tokens = [mint_token(small_home, web) for _ in range(12)]
        state_before = (small_home / "state.json").read_bytes()
        files_before = sorted(p.name for p in small_home.iterdir())
        fill(small_home.parent)

        handed_out, refused_token = [], None
        for i, token in enumerate(tokens[:-1]):
            _, csr = openssl_csr(tmp_path, f"w{i}")
            status, doc = curl_enroll(ca, csr, token)
            if status == 200:
                handed_out.append(doc["serial"])
                continue
            assert status == 503 and doc["error"] == "unavailable", doc
            assert "nothing was recorded or issued" in doc["detail"]
            assert str(small_home) not in doc["detail"]  # no local path told to a peer
            refused_token = token
            break
        assert refused_token is not None, "the full disk never refused an enrollment"
        assert curl(ca, "/healthz")[0] == 200

        out = run_meshca("rotate", "--home", str(small_home), "--force-intermediate", check=False)
        assert out.returncode == 1 and "nothing changed" in out.stderr, out.stderr
        assert (small_home / "state.json").read_bytes() == state_before
        assert sorted(p.name for p in small_home.iterdir()) == files_before

        (small_home.parent / "filler").unlink()  # space returns
        _, csr = openssl_csr(tmp_path, "again")
        status, doc = curl_enroll(ca, csr, refused_token)  # the refused token still works
        assert status == 200, doc
        handed_out.append(doc["serial"])
        assert {c["serial"] for c in ledger_certs(small_home)} >= set(handed_out)
        status, doc = curl_enroll(ca, csr, refused_token)
        assert status == 401  # and only once
        out = run_meshca("rotate", "--home", str(small_home), "--force-intermediate", "--json")
        assert json.loads(out.stdout)["action"] == "rotate_intermediate"
    finally:
        ca.stop()
