"""The demo echo app reports exactly what it received (used behind sidecars later)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys


def test_echo_reports_request(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.echo", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line
        url = line.split("listening on ", 1)[1].strip()
        body = b"x" * 100_000
        (tmp_path / "body").write_bytes(body)
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-H",
                "X-Test: 1",
                "--data-binary",
                f"@{tmp_path / 'body'}",
                url + "/a/b?q=1",
            ],
            capture_output=True,
            check=True,
            timeout=20,
        ).stdout
        doc = json.loads(out)
        assert (doc["method"], doc["path"], doc["query"]) == ("POST", "/a/b", "q=1")
        assert doc["headers"]["X-Test"] == "1"
        assert doc["body_bytes"] == len(body)
        assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
