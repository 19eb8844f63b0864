"""`sidecar run` with a bad configuration stops at once, naming every bad key; nothing listens."""

from __future__ import annotations

import subprocess
import sys


def test_bad_config_stops_startup(tmp_path):
    (tmp_path / "ca-root.pem").write_text("x")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        "ca:\n  url: http://127.0.0.1:8443\n  bundle: ca-root.pem\n  token_file: token\n"
        "inbound:\n  listen: 127.0.0.1:0\n  app: 10.0.0.1:5000\n  colour: red\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    for key in ("ca.url", "inbound.app", "inbound.colour"):
        assert f"config error: {key}:" in res.stderr, res.stderr
    assert "listening" not in res.stdout and "Traceback" not in res.stderr


def test_missing_config_file(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1 and "cannot read" in res.stderr
