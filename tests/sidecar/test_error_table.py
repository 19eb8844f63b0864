"""The sidecar's own answers: every code it can raise is in the one table (sidecar/errors.py)
with its status, docs/sidecar.md lists every code, and an answer never tells the peer a
local file path or an internal error."""

from __future__ import annotations

import ast
import json
import pathlib
import re

import pytest

from sidecar.engines.http1.framing import error_response
from sidecar.errors import STATUS, SidecarError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def raised_codes() -> set[str]:
    """Every literal code passed to SidecarError(...) anywhere in sidecar/."""
    codes: set[str] = set()
    for path in (ROOT / "sidecar").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "SidecarError"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                codes.add(node.args[0].value)
    return codes


def test_every_raised_code_has_a_status():
    codes = raised_codes()
    assert len(codes) > 20  # the walk found the call sites
    assert codes - set(STATUS) == set()


def test_docs_list_every_code_with_its_status():
    text = (ROOT / "docs" / "sidecar.md").read_text()
    section = text.split("## Errors the sidecar answers itself", 1)[1].split("\n## ", 1)[0]
    for code, status in STATUS.items():
        row = [line for line in section.splitlines() if f"`{code}`" in line]
        assert row, f"{code} is not in docs/sidecar.md"
        if row[0].startswith("|"):
            assert row[0].startswith(f"| {status} |"), f"{code} is listed under another status"


def test_no_literal_status_outside_the_table():
    """Statuses come from the table: no SidecarError call site passes a number."""
    for path in (ROOT / "sidecar").rglob("*.py"):
        assert not re.search(r"SidecarError\(\s*\d", path.read_text()), path


def test_unknown_code_is_a_bug_not_a_500_with_a_made_up_status():
    with pytest.raises(KeyError):
        SidecarError("no_such_code", "x")


@pytest.mark.parametrize("code", sorted(STATUS))
def test_answer_is_the_json_error_with_the_tables_status(code):
    raw = error_response(SidecarError(code, "what went wrong"), close=False)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 %d " % STATUS[code])
    assert json.loads(body) == {"error": code, "detail": "what went wrong"}


def test_details_name_no_local_paths():
    """No call site builds a detail from an OSError or a path (they go to the log only)."""
    for path in (ROOT / "sidecar").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "SidecarError":
                src = ast.unparse(node)
                assert "strerror" not in src and "filename" not in src and ".path" not in src, (
                    f"{path.name}: {src}"
                )
