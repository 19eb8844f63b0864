"""Sidecar configuration of the listeners' limits and shutdown: `inbound.max_connections`,
`outbound.max_connections` and `drain_timeout`, with their defaults and errors by key."""

from __future__ import annotations

import pytest
import yaml

from sidecar.config import ConfigError, parse_config

BASE = {
    "ca": {"url": "https://127.0.0.1:8443", "bundle": "ca-root.pem", "token_file": "token"},
    "inbound": {"listen": "0.0.0.0:15006", "app": "127.0.0.1:5000"},
    "outbound": {"listen": "127.0.0.1:15001"},
}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "ca-root.pem").write_text("x")
    return tmp_path


def doc_with(**changes):
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in changes.items():
        *parents, last = path.split("__")
        cur = doc
        for p in parents:
            cur = cur[p]
        cur[last] = value
    return doc


def test_defaults(folder):
    cfg = parse_config(BASE, folder / "sidecar.yaml")
    assert cfg.inbound.max_connections == 2048
    assert cfg.outbound.max_connections == 1024
    assert cfg.drain_timeout == 20


def test_values_are_read(folder):
    doc = doc_with(inbound__max_connections=10, outbound__max_connections=3, drain_timeout=2.5)
    cfg = parse_config(doc, folder / "sidecar.yaml")
    assert (cfg.inbound.max_connections, cfg.outbound.max_connections) == (10, 3)
    assert cfg.drain_timeout == 2.5


def test_zero_drain_is_allowed(folder):
    assert parse_config(doc_with(drain_timeout=0), folder / "s.yaml").drain_timeout == 0


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("inbound__max_connections", 0, "inbound.max_connections: must be a whole number"),
        ("inbound__max_connections", 2.5, "inbound.max_connections: must be a whole number"),
        ("inbound__max_connections", "many", "inbound.max_connections: must be a whole number"),
        ("inbound__max_connections", True, "inbound.max_connections: must be a whole number"),
        ("outbound__max_connections", -1, "outbound.max_connections: must be a whole number"),
        ("outbound__max_connections", 10**7, "outbound.max_connections: must be a whole number"),
        ("drain_timeout", -1, "drain_timeout: must be a number between 0 and 3600"),
        ("drain_timeout", "soon", "drain_timeout: must be a number between 0 and 3600"),
        ("outbound__max_conns", 5, "outbound.max_conns: unknown key"),
    ],
)
def test_bad_values_name_their_key(folder, path, value, message):
    with pytest.raises(ConfigError) as e:
        parse_config(doc_with(**{path: value}), folder / "sidecar.yaml")
    assert any(message in p for p in e.value.problems), e.value.problems


def test_every_problem_reported_together(folder):
    doc = doc_with(inbound__max_connections=0, outbound__max_connections=0, drain_timeout=-5)
    with pytest.raises(ConfigError) as e:
        parse_config(doc, folder / "sidecar.yaml")
    assert len(e.value.problems) == 3, e.value.problems
