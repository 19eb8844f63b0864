"""The interception rules, as text (pure)."""

import pytest

from sidecar.initnet import NetPlan, parse_ports, rules


def test_rules_redirect_app_port_and_outbound_but_not_the_sidecar():
    text = rules(NetPlan(app_ports=(8080,), exclude_outbound_ports=(5432,)))
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert "-A MESHCA_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006" in lines
    owner = lines.index("-A MESHCA_OUTPUT -m owner --uid-owner 1337 -j RETURN")
    redirect = lines.index("-A MESHCA_OUTPUT -p tcp -j REDIRECT --to-ports 15001")
    assert owner < redirect, "the sidecar's own traffic is exempt before the catch-all"
    assert lines.index("-A MESHCA_OUTPUT -p tcp --dport 5432 -j RETURN") < redirect
    assert "-A MESHCA_OUTPUT -o lo -j RETURN" in lines


def test_outbound_only_pod_has_no_inbound_jump():
    assert "PREROUTING" not in rules(NetPlan())


@pytest.mark.parametrize(
    "values,expected", [(["8080"], (8080,)), (["80,443", "8443"], (80, 443, 8443)), ([], ())]
)
def test_parse_ports(values, expected):
    assert parse_ports(values, "--app-port") == expected


@pytest.mark.parametrize("bad", ["http", "0", "70000"])
def test_parse_ports_refuses(bad):
    with pytest.raises(ValueError, match="--app-port"):
        parse_ports([bad], "--app-port")
