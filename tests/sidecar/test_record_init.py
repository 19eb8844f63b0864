"""The per-request objects (`ExchangeRecord`, `Exchange`, `Hop`) are dataclasses with an
`__init__` written by hand (the generated one would be interpreted code in the compiled
request path). These tests keep the hand-written ones honest: every field is set, to its
declared default when not given, and every parameter lands in the field of its name.
They run against whichever build is loaded (compiled, or plain Python)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import time

import pytest

from sidecar.compiled import source
from sidecar.engines.http1.exchange import Exchange
from sidecar.engines.http1.framing import CHUNKED
from sidecar.telemetry.record import ExchangeRecord
from sidecar.telemetry.tracing import Hop


def default_of(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"{f.name} has no default"
    return f.default_factory()


def params(cls: type) -> list[inspect.Parameter]:
    """`cls.__init__`'s parameters but self, from its source (a compiled function shows no
    signature), defaults evaluated in the module."""
    tree = ast.parse(source(cls.__module__).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = init.args.args[1:]
    defaults = [None] * (len(args) - len(init.args.defaults)) + init.args.defaults
    space = vars(sys.modules[cls.__module__])
    return [
        inspect.Parameter(
            a.arg,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=inspect.Parameter.empty if d is None else eval(ast.unparse(d), space),
        )
        for a, d in zip(args, defaults, strict=True)
    ]


def test_exchange_record_takes_every_field_in_order_with_its_default() -> None:
    fields = dataclasses.fields(ExchangeRecord)
    ps = params(ExchangeRecord)
    assert [p.name for p in ps] == [f.name for f in fields]
    for p, f in zip(ps[1:], fields[1:], strict=True):
        assert p.default == default_of(f), f.name
    rec = ExchangeRecord("inbound")
    for f in fields[1:]:
        assert getattr(rec, f.name) == default_of(f), f.name
    # positionally, as the access-log tests build them, and by keyword
    assert ExchangeRecord("inbound", "GET", "/ok", 200).status == 200
    assert ExchangeRecord("outbound", peer="spiffe://x/y").peer == "spiffe://x/y"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ExchangeRecord)][1:])
def test_exchange_record_sets_each_field_given(name: str) -> None:
    # (the compiled class checks types: a value of the field's own type)
    sample = {"str": "v", "int": 7, "float": 1.5, "bool": True, "tuple": ("a",)}
    tree = ast.parse(source(ExchangeRecord.__module__).read_text())  # (compiled: no types)
    shown = next(
        ast.unparse(n.annotation)
        for n in ast.walk(tree)
        if isinstance(n, ast.AnnAssign) and ast.unparse(n.target) == name
    )
    value = next(v for k, v in sample.items() if shown.startswith(k))
    assert getattr(ExchangeRecord("inbound", **{name: value}), name) == value


def test_exchange_sets_every_field_and_the_ones_given() -> None:
    rec = ExchangeRecord("inbound")
    before = time.perf_counter()
    ex = Exchange(b"GET", b"/a", [(b"host", b"x")], "1.1", True, rec)
    required = {p.name for p in params(Exchange) if p.default is inspect.Parameter.empty}
    for f in dataclasses.fields(Exchange):
        if f.name == "start":
            assert before <= ex.start <= time.perf_counter()
        elif f.name not in required:
            assert getattr(ex, f.name) == default_of(f), f.name
    assert (ex.method, ex.target, ex.version, ex.keep_alive, ex.record) == (
        b"GET",
        b"/a",
        "1.1",
        True,
        rec,
    )
    assert ex.body is not Exchange(b"GET", b"/", [], "1.1", True, rec).body  # not shared
    ex = Exchange(
        b"POST",
        b"/b",
        [],
        "1.1",
        False,
        rec,
        framing=CHUNKED,
        body_done=True,
        drop=frozenset({b"x-hop"}),
        continue_pending=True,
    )
    assert (ex.framing, ex.body_done, ex.drop, ex.continue_pending) == (
        CHUNKED,
        True,
        frozenset({b"x-hop"}),
        True,
    )
    for p in params(Exchange):
        assert any(f.name == p.name for f in dataclasses.fields(Exchange)), p.name


def test_hop_takes_every_field_in_order() -> None:
    assert [p.name for p in params(Hop)] == [f.name for f in dataclasses.fields(Hop)]
    hop = Hop(b"t" * 32, b"s" * 16, b"p" * 16, 1, b"st", b"rid")
    assert dataclasses.astuple(hop) == (b"t" * 32, b"s" * 16, b"p" * 16, 1, b"st", b"rid")
