"""`;` in request paths is refused by default, so a DENY rule cannot be side-stepped with
path parameters (`/admin;x`, `/x/..;/admin`, which Java routers serve as `/admin`).

Two backend sidecars with the same policy (DENY `/admin`, `/admin/*`): one with
the default `path_with_semicolons_action` (REJECT_REQUEST: 400 `bad_path`, the
app sees nothing), one with ALLOW (the path goes to the app as it came, and the
policy saw that path). Letter case is kept and matched exactly, as documented.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from conftest import BACKEND
from helpers import curl_enroll, mint_token, openssl_csr, run_meshca, start_ca
from mesh import app_log, hostport, sidecar_config, start_echo, start_sidecar

CALLER = "spiffe://cluster.local/ns/tools/sa/curl"
POLICY = {
    "rules": [{"name": "no-admin", "action": "DENY", "to": {"paths": ["/admin", "/admin/*"]}}]
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("semicolons")
    home = root / "ca"
    run_meshca("init", "--home", str(home))
    ca = start_ca(home)
    procs = [ca]
    try:
        app_log_path = root / "app.log"
        app = start_echo(app_log_path)
        procs.append(app)
        inbound = {}
        for mode in ("REJECT_REQUEST", "ALLOW"):
            extra = {} if mode == "REJECT_REQUEST" else {"path_with_semicolons_action": mode}
            cfg = sidecar_config(
                root,
                f"backend-{mode.lower()}",
                ca,
                BACKEND,
                app=hostport(app.urls["echo"]),
                inbound_extra=extra,
            )
            (cfg.parent / "policy.yaml").write_text(yaml.safe_dump(POLICY))
            doc = yaml.safe_load(cfg.read_text())
            doc["policy"] = {"file": "policy.yaml"}
            cfg.write_text(yaml.safe_dump(doc))
            p = start_sidecar(cfg)
            procs.append(p)
            inbound[mode] = hostport(p.urls["inbound"])
        key, csr = openssl_csr(root, "caller")
        status, enrolled = curl_enroll(ca, csr, mint_token(home, CALLER))
        assert status == 200, enrolled
        chain = root / "caller.pem"
        chain.write_text(enrolled["certificate_chain"])
        yield {"inbound": inbound, "client": (chain, key), "app_log": app_log_path}
    finally:
        for p in reversed(procs):
            p.stop()


def curl(env, mode: str, path: str) -> tuple[int, dict]:
    chain, key = env["client"]
    res = subprocess.run(
        [
            "curl",
            "-sS",
            "-k",
            "--max-time",
            "10",
            "--path-as-is",
            "--cert",
            str(chain),
            "--key",
            str(key),
            "-w",
            "\n%{http_code}",
            f"https://{env['inbound'][mode]}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    body, _, code = res.stdout.rpartition("\n")
    return int(code), json.loads(body)


@pytest.mark.parametrize(
    "path", ["/admin;x", "/admin;jsessionid=1", "/x/..;/admin", "/admin%3Bx", "/public;v=1"]
)
def test_semicolon_paths_are_refused_by_default(env, path):
    before = len(app_log(env["app_log"]))
    status, doc = curl(env, "REJECT_REQUEST", path)
    assert status == 400 and doc["error"] == "bad_path", doc
    assert len(app_log(env["app_log"])) == before, "the app must see nothing"


def test_semicolons_in_the_query_are_fine(env):
    status, doc = curl(env, "REJECT_REQUEST", "/public?a=1;b=2")
    assert status == 200 and doc["path"] == "/public" and doc["query"] == "a=1;b=2"


@pytest.mark.parametrize("mode", ["REJECT_REQUEST", "ALLOW"])
def test_the_deny_rule_holds_in_both_modes(env, mode):
    for path in ("/admin", "/admin/x", "/x/../admin"):
        status, doc = curl(env, mode, path)
        assert status == 403 and doc["rule"] == "no-admin", (path, doc)


def test_with_allow_the_app_gets_the_path_the_policy_saw(env):
    """Opted in: `/admin;x` is not `/admin` to the policy, and reaches the app unchanged."""
    for path in ("/admin;x", "/x/..;/admin"):
        status, doc = curl(env, "ALLOW", path)
        assert status == 200 and doc["path"] == path, doc


def test_letter_case_is_kept(env):
    """Documented: DENY `/admin` does not match `/ADMIN`; the app receives `/ADMIN`."""
    status, doc = curl(env, "REJECT_REQUEST", "/ADMIN")
    assert status == 200 and doc["path"] == "/ADMIN"
