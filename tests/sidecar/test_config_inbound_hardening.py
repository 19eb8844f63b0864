"""Config keys for inbound hardening: header names with `_` and `;` in paths.

Defaults, each accepted value, and a bad value stopping start-up with an error
naming the dotted key; JWT header names the sidecar reads or writes may not
contain `_`.
"""

from __future__ import annotations

import copy

import pytest

from sidecar.config import ConfigError, parse_config

BASE = {
    "ca": {"url": "https://127.0.0.1:8443", "bundle": "ca-root.pem", "token_file": "token"},
    "inbound": {"listen": "0.0.0.0:15006", "app": "127.0.0.1:5000"},
}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "ca-root.pem").write_text("x")
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    return tmp_path


def parse(folder, **inbound):
    doc = copy.deepcopy(BASE)
    doc["inbound"].update(inbound)
    return parse_config(doc, folder / "sidecar.yaml")


def test_defaults_drop_underscore_headers_and_reject_semicolons(folder):
    cfg = parse(folder).inbound
    assert cfg.headers_with_underscores_action == "DROP_HEADER"
    assert cfg.path_with_semicolons_action == "REJECT_REQUEST"


@pytest.mark.parametrize("value", ["ALLOW", "REJECT_REQUEST", "DROP_HEADER"])
def test_underscore_actions(folder, value):
    cfg = parse(folder, headers_with_underscores_action=value).inbound
    assert cfg.headers_with_underscores_action == value


@pytest.mark.parametrize("value", ["ALLOW", "REJECT_REQUEST"])
def test_semicolon_actions(folder, value):
    assert parse(folder, path_with_semicolons_action=value).inbound.path_with_semicolons_action == (
        value
    )


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("headers_with_underscores_action", "drop", "ALLOW, REJECT_REQUEST, DROP_HEADER"),
        ("headers_with_underscores_action", True, "ALLOW, REJECT_REQUEST, DROP_HEADER"),
        ("headers_with_underscores_action", ["ALLOW"], "ALLOW, REJECT_REQUEST, DROP_HEADER"),
        ("path_with_semicolons_action", "DROP_HEADER", "ALLOW, REJECT_REQUEST"),
        ("path_with_semicolons_action", None, "ALLOW, REJECT_REQUEST"),
    ],
)
def test_bad_values_name_the_dotted_key(folder, key, value, allowed):
    with pytest.raises(ConfigError) as e:
        parse(folder, **{key: value})
    assert e.value.problems == [f"inbound.{key}: must be one of {allowed}"]


@pytest.mark.parametrize("field", ["from_header", "claims_header"])
def test_jwt_header_names_with_underscores_are_refused(folder, field):
    doc = copy.deepcopy(BASE)
    doc["jwt"] = {
        "issuers": [
            {"issuer": "i", "jwks_file": "jwks.json", field: "x_jwt_thing"},
        ]
    }
    with pytest.raises(ConfigError) as e:
        parse_config(doc, folder / "sidecar.yaml")
    assert any(
        p.startswith(f"jwt.issuers[0].{field}: must not contain '_'") for p in e.value.problems
    )
