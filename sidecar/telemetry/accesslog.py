"""The access log: one JSON line per exchange, written from its `ExchangeRecord`.

Which exchanges get a line is the config's `access_log` (Envoy's access-log
filters): all of them, only errors (a status of 400 or more, or an answer the
sidecar gave itself), or a sample of the rest with every error kept. Lines of
AUDIT and dry-run rules are kept in every mode but `off` (the log is their only
record). `off` builds no `AccessLog` at all.
"""

from __future__ import annotations

import asyncio
import json
import json.encoder
import random
import time
from typing import TextIO

from sidecar.telemetry.record import ExchangeRecord

_quote = json.encoder.encode_basestring_ascii  # the C string encoder json.dumps uses


def _str_or_null(value: str | None) -> str:
    return _quote(value) if value is not None else "null"


class AccessLog:
    """One JSON line per exchange on a stream (stdout by default), flushed at least every second.

    Lines are formatted by hand: a generic json.dumps per request was a tenth
    of the proxy's time. Optional fields are written only when set.
    """

    def __init__(self, stream: TextIO, errors_only: bool = False, sample: float = 1.0) -> None:
        self.stream = stream
        self.errors_only = errors_only
        self.sample = sample
        self._filtered = errors_only or sample < 1.0
        self._dirty = False
        self._second = -1
        self._ts = ""

    def write(self, rec: ExchangeRecord) -> None:
        """Write one record (unless the filter leaves out this one)."""
        if self._filtered and rec.status < 400 and rec.error is None and not rec.audit:
            if not rec.dry_run and (
                self.errors_only or random.random() >= self.sample  # noqa: S311 (sampling)
            ):
                return
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        line = (
            f'{{"ts":"{self._ts}","direction":"{rec.direction}","method":{_quote(rec.method)},'
            f'"path":{_str_or_null(rec.path)},"status":{rec.status},'
            f'"peer":{_str_or_null(rec.peer)},"ms":{rec.ms:.2f},'
            f'"bytes_in":{rec.bytes_in},"bytes_out":{rec.bytes_out}'
        )
        if rec.service is not None:
            line += f',"service":{_quote(rec.service)}'
        if rec.decision is not None:
            line += f',"decision":{_quote(rec.decision)}'
        if rec.rule is not None:
            line += f',"rule":{_quote(rec.rule)}'
        if rec.dry_run:
            line += f',"dry_run":{json.dumps(list(rec.dry_run))}'
        if rec.audit:
            line += f',"audit":{json.dumps(list(rec.audit))}'
        if rec.request_principal is not None:
            line += f',"request_principal":{_quote(rec.request_principal)}'
        if rec.error is not None:
            line += f',"error":{_quote(rec.error)}'
        if rec.upstream is not None:
            line += f',"upstream":{_quote(rec.upstream)}'
        if rec.retries:
            line += f',"retries":{json.dumps(list(rec.retries))}'
        if rec.fault is not None:
            line += f',"fault":{_quote(rec.fault)}'
        if rec.trace_id is not None:
            line += f',"trace_id":"{rec.trace_id}"'  # hex digits only (checked when parsed)
        if rec.request_id is not None:
            line += f',"request_id":{_quote(rec.request_id)}'
        if rec.protocol is not None:
            line += f',"protocol":"{rec.protocol}"'  # one of the engine's own names
        if rec.grpc_status is not None:
            line += f',"grpc_status":{rec.grpc_status}'
        self.stream.write(line + "}\n")
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_later(1.0, self._flush)

    def _flush(self) -> None:
        self._dirty = False
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass
