"""The access log's sampling: errors are always written, a share of the rest is."""

from __future__ import annotations

import asyncio
import io
import json

from sidecar.telemetry.accesslog import AccessLog
from sidecar.telemetry.record import ExchangeRecord


def _written(log: AccessLog, records: list[ExchangeRecord]) -> list[dict]:
    async def go() -> None:
        for rec in records:
            log.write(rec)

    asyncio.run(go())
    return [json.loads(line) for line in log.stream.getvalue().splitlines()]  # type: ignore[attr-defined]


def test_a_sample_of_the_successes_and_every_error():
    ok = [ExchangeRecord("inbound", "GET", "/ok", 200) for _ in range(2000)]
    errors = [ExchangeRecord("inbound", "GET", "/bad", 500) for _ in range(50)]
    refused = [ExchangeRecord("inbound", "GET", "/no", 403, error="denied") for _ in range(50)]
    lines = _written(AccessLog(io.StringIO(), sample=0.5), ok + errors + refused)
    kept_ok = sum(1 for r in lines if r["status"] == 200)
    assert 850 <= kept_ok <= 1150  # 2000 at 0.5: more than 6 standard deviations either side
    assert sum(1 for r in lines if r["status"] >= 400) == 100


def test_errors_only_keeps_the_sidecars_own_answers():
    recs = [
        ExchangeRecord("outbound", "GET", "/a", 200),
        ExchangeRecord("outbound", "GET", "/b", 0, error="client_disconnected"),
        ExchangeRecord("outbound", "GET", "/c", 404),
        ExchangeRecord("outbound", "GET", "/d", 101),
    ]
    lines = _written(AccessLog(io.StringIO(), errors_only=True), recs)
    assert [r["path"] for r in lines] == ["/b", "/c"]


def test_audit_and_dry_run_lines_are_kept_whatever_the_filter():
    """The access log is the only record of AUDIT and dry-run rules: an allowed request
    they matched is written in errors-only mode and when sampling drops the rest."""
    recs = [
        ExchangeRecord("inbound", "GET", "/plain", 200),
        ExchangeRecord("inbound", "POST", "/audited", 200, audit=("audit-writes",)),
        ExchangeRecord("inbound", "GET", "/would-deny", 200, dry_run=("new-rule",)),
    ]
    for log in (AccessLog(io.StringIO(), errors_only=True), AccessLog(io.StringIO(), sample=0)):
        lines = _written(log, recs)
        assert [r["path"] for r in lines] == ["/audited", "/would-deny"]
        assert lines[0]["audit"] == ["audit-writes"] and lines[1]["dry_run"] == ["new-rule"]
