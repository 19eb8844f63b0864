"""The pure parts of the listener: which ClientHello is legacy TLS (below 1.2), the
protocol_version alert it is answered with, and the `meshca serve` limit flags."""

from __future__ import annotations

import pytest

from meshca.config import ConfigError, build_serve_config
from meshca.listener import legacy_client_version, protocol_version_alert


def hello(client_version: bytes, record_version: bytes = b"\x03\x01") -> bytes:
    """The first bytes of a ClientHello: record header, handshake header, client_version."""
    return (
        b"\x16" + record_version + b"\x00\xc8" + b"\x01\x00\x00\xc4" + client_version + b"\0" * 32
    )


@pytest.mark.parametrize(
    "head,legacy",
    [
        (hello(b"\x03\x01"), b"\x03\x01"),  # TLS 1.0
        (hello(b"\x03\x02"), b"\x03\x02"),  # TLS 1.1
        (hello(b"\x03\x00", b"\x03\x00"), b"\x03\x00"),  # SSL 3.0
        (hello(b"\x03\x03"), None),  # TLS 1.2, and TLS 1.3 (which says 1.2 here)
        (hello(b"\x03\x04"), None),  # a future version is not legacy
        (hello(b"\x03\x01")[:10], None),  # too short to tell: TLS decides
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),  # not TLS: TLS refuses it
        (b"\x16\x03\x01\x00\xc8\x02\x00\x00\xc4\x03\x01", None),  # ServerHello, not a client's
        (b"\x17\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x01", None),  # application data record
        (b"\x16\x02\x00\x00\xc8\x01\x00\x00\xc4\x02\x00", None),  # not a 3.x record
    ],
)
def test_legacy_client_version(head, legacy):
    assert legacy_client_version(head) == legacy


@pytest.mark.parametrize(
    "version,record",
    [
        (b"\x03\x01", b"\x15\x03\x01\x00\x02\x02\x46"),
        (b"\x03\x02", b"\x15\x03\x02\x00\x02\x02\x46"),
        (b"\x03\x00", b"\x15\x03\x01\x00\x02\x02\x46"),
    ],
)
def test_protocol_version_alert_is_fatal_70(version, record):
    assert protocol_version_alert(version) == record


def test_serve_defaults(tmp_path):
    cfg = build_serve_config(str(tmp_path))
    assert cfg.max_connections == 4096 and cfg.drain_timeout == 20


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_connections": 0}, "--max-connections: must be between 1 and 1000000"),
        ({"drain_timeout": -1}, "--drain-timeout: must be between 0 and 3600 seconds"),
        ({"drain_timeout": 4000}, "--drain-timeout: must be between 0 and 3600 seconds"),
    ],
)
def test_serve_flags_named_in_errors(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_serve_config(str(tmp_path), **kwargs)
