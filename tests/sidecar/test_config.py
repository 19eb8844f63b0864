"""Sidecar configuration: every problem named by its key; relative paths; defaults."""

from pathlib import Path

import pytest
import yaml

from sidecar.config import ConfigError, load_config, parse_config

BASE = {
    "trust_domain": "cluster.local",
    "ca": {"url": "https://127.0.0.1:8443", "bundle": "ca-root.pem", "token_file": "token"},
    "inbound": {"listen": "0.0.0.0:15006", "app": "127.0.0.1:5000"},
    "outbound": {
        "listen": "127.0.0.1:15001",
        "services": {
            "backend.default": {
                "endpoints": ["127.0.0.1:16006"],
                "identity": "spiffe://cluster.local/ns/default/sa/backend",
            }
        },
    },
    "admin": {"listen": "127.0.0.1:15000"},
}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "ca-root.pem").write_text("x")
    return tmp_path


def parse(folder, doc):
    return parse_config(doc, folder / "sidecar.yaml")


def test_example_from_the_issue(folder):
    cfg = parse(folder, BASE)
    assert cfg.ca.bundle == folder / "ca-root.pem" and cfg.ca.token_file == folder / "token"
    assert (cfg.inbound.listen.host, cfg.inbound.listen.port) == ("0.0.0.0", 15006)
    assert cfg.outbound.services["backend.default"].endpoints[0].port == 16006
    assert cfg.health.port == 15021 and cfg.admin.port == 15000
    assert cfg.inbound.app_timeout == 30 and cfg.inbound.max_body_bytes is None


def test_inbound_and_outbound_are_optional(folder):
    doc = {k: v for k, v in BASE.items() if k not in ("inbound", "outbound")}
    cfg = parse(folder, doc)
    assert cfg.inbound is None and cfg.outbound is None


def with_(path, value):
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, last = path.split(".")
    cur = doc
    for p in parents:
        cur = cur[p]
    if value is KeyError:
        del cur[last]
    else:
        cur[last] = value
    return doc


BAD = [
    ("colour", "blue", "colour: unknown key"),
    ("ca.url", KeyError, "ca.url: required"),
    ("ca", KeyError, "ca: required"),
    ("ca.url", "http://ca:8443", "ca.url: must be an https:// URL"),
    ("ca.bundle", "missing.pem", "ca.bundle: no such file"),
    ("ca.tokenfile", "t", "ca.tokenfile: unknown key"),
    ("inbound.app", "10.0.0.5:5000", "inbound.app: the app must listen on loopback"),
    ("inbound.listen", "15006", "inbound.listen:"),
    ("inbound.app_timeout", "soon", "inbound.app_timeout: must be a number"),
    ("inbound.max_body_bytes", -1, "inbound.max_body_bytes"),
    ("outbound.listen", "0.0.0.0:15001", "outbound.listen: must be a loopback address"),
    ("outbound.services.backend.default.identity", "backend", "identity: SPIFFE ID must start"),
    ("outbound.services.backend.default.endpoints", [], "endpoints: must be a non-empty list"),
    ("admin.listen", "0.0.0.0:15000", "admin.listen: must be a loopback address"),
    ("trust_domain", "Bad Domain", "trust_domain:"),
]


@pytest.mark.parametrize("path,value,message", BAD)
def test_bad_values_name_their_key(folder, path, value, message):
    if path.startswith("outbound.services.backend.default."):
        doc = yaml.safe_load(yaml.safe_dump(BASE))
        doc["outbound"]["services"]["backend.default"][path.rsplit(".", 1)[1]] = value
    else:
        doc = with_(path, value)
    with pytest.raises(ConfigError) as e:
        parse(folder, doc)
    assert any(message in p for p in e.value.problems), e.value.problems


def test_all_problems_reported_together(folder):
    doc = with_("ca.url", "http://x")
    doc["inbound"]["app"] = "10.1.1.1:80"
    doc["extra"] = 1
    with pytest.raises(ConfigError) as e:
        parse(folder, doc)
    assert len(e.value.problems) == 3


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ca: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    assert Path(bad).exists()


def test_metrics_and_tracing_settings(folder):
    cfg = parse(folder, {**BASE, "metrics": {}, "tracing": {"sampling": 0.5}})
    assert str(cfg.metrics.listen) == "0.0.0.0:15090" and cfg.tracing.sampling == 0.5
    assert parse(folder, BASE).metrics is None and parse(folder, BASE).tracing.otlp_endpoint is None


@pytest.mark.parametrize(
    "tracing, problem",
    [
        ({"sampling": 2}, "tracing.sampling: must be a number between 0 and 1"),
        ({"otlp_endpoint": "collector:4318"}, "tracing.otlp_endpoint: must be an http://"),
        # logged when an export fails: credentials in it are refused at start
        ({"otlp_endpoint": "https://u:tok@c/v1/traces"}, "must not contain user:password@"),
        ({"otlp_queue": 0}, "tracing.otlp_queue: must be a whole number"),
    ],
)
def test_bad_tracing_settings_name_their_key(folder, tracing, problem):
    with pytest.raises(ConfigError) as e:
        parse(folder, {**BASE, "tracing": tracing})
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_ca_url_may_list_replicas(folder):
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["ca"]["url"] = ["https://ca-0.mesh:8443", "https://ca-1.mesh:8443/"]
    cfg = parse(folder, doc)
    assert cfg.ca.urls == ("https://ca-0.mesh:8443", "https://ca-1.mesh:8443/")
    assert cfg.ca.url == "https://ca-0.mesh:8443"
    assert parse(folder, BASE).ca.urls == ("https://127.0.0.1:8443",)
    for bad in ([], ["https://a", "http://b"], ["https://a", 3]):
        doc["ca"]["url"] = bad
        with pytest.raises(ConfigError) as e:
            parse(folder, doc)
        assert any(p.startswith("ca.url: must be an https:// URL") for p in e.value.problems)


def test_access_log_modes(folder):
    assert (parse(folder, BASE).access_log.mode, parse(folder, BASE).access_log.sample) == (
        "all",
        1.0,
    )
    cfg = parse(folder, {**BASE, "access_log": {"mode": "errors"}})
    assert cfg.access_log.mode == "errors"
    # YAML 1.1 reads a bare `off` as false (and `on` as true): what the user wrote is meant
    assert parse(folder, {**BASE, **yaml.safe_load("access_log: {mode: off}")}).access_log.mode == (
        "off"
    )
    assert parse(folder, {**BASE, **yaml.safe_load("access_log: {mode: on}")}).access_log.mode == (
        "all"
    )
    assert parse(folder, {**BASE, "access_log": {"sample": 0.1}}).access_log.sample == 0.1


@pytest.mark.parametrize(
    "access_log, problem",
    [
        ({"mode": "some"}, "access_log.mode: must be one of all, errors, off"),
        ({"sample": 1.5}, "access_log.sample: must be a number between 0 and 1"),
        ({"sample": "half"}, "access_log.sample: must be a number between 0 and 1"),
        ({"format": "json"}, "access_log.format: unknown key"),
        ("off", "access_log: must be a mapping"),
    ],
)
def test_bad_access_log_settings_name_their_key(folder, access_log, problem):
    with pytest.raises(ConfigError) as e:
        parse(folder, {**BASE, "access_log": access_log})
    assert any(problem in p for p in e.value.problems), e.value.problems
