"""`sidecar run` refuses, naming the rule, a policy whose request principal could name either
of two trusted issuers (one's name plus `/` starts the other's); a reload with such a rule
keeps the last good policy."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import yaml

from meshca import pki


def test_start_up_refuses_an_ambiguous_request_principal(tmp_path):
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": []}))
    key = pki.new_key()
    root = pki.build_root(key, dt.datetime.now(dt.UTC))
    (tmp_path / "bundle.pem").write_text(pki.pem_join([root]))
    (tmp_path / "token").write_text("x\n")
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {
                        "name": "partner-c",
                        "action": "ALLOW",
                        "from": {"request_principals": ["https://a/b/c"]},
                    }
                ]
            }
        )
    )
    issuer = {"audiences": ["me"], "jwks_file": "jwks.json"}
    (tmp_path / "sidecar.yaml").write_text(
        yaml.safe_dump(
            {
                "trust_domain": "cluster.local",
                "ca": {"url": "https://127.0.0.1:1", "bundle": "bundle.pem", "token_file": "token"},
                "inbound": {"listen": "127.0.0.1:0", "app": "127.0.0.1:9"},
                "jwt": {
                    "issuers": [
                        {"issuer": "https://a", **issuer},
                        {"issuer": "https://a/b", **issuer},
                    ]
                },
                "policy": {"file": "policy.yaml"},
                "admin": {"listen": "127.0.0.1:0"},
                "health": {"listen": "127.0.0.1:0"},
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(tmp_path / "sidecar.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1, out.stderr
    assert "rules[0] (partner-c).from.request_principals" in out.stderr
    assert "could name issuer 'https://a' or 'https://a/b'" in out.stderr
