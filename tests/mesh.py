"""A small mesh on loopback for end-to-end tests: a CA, echo apps and sidecars as processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from helpers import CAProcess, Lines, gave_up, mint_token, stop_process


@dataclass
class Proc:
    """A child process whose stdout lines are collected in the background."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    _logs: dict[str, Lines] = field(default_factory=dict, repr=False)

    def stop(self) -> None:
        stop_process(self.proc)

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def _spawn(args: list[str], wait_for: list[str], timeout: float = 20) -> Proc:
    """Start `args` and wait until it says where each of `wait_for` listens."""
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    p = Proc(proc)
    out, err = Lines(proc.stdout, p.lines), Lines(proc.stderr, p.err)
    pending = set(wait_for)

    def listening(line: str) -> bool:
        m = re.search(r"(\w+):? listening on (\S+)", line)
        if m and m.group(1) not in p.urls:
            p.urls[m.group(1)] = m.group(2)
            pending.discard(m.group(1))
        return not pending

    if pending and not out.follow(listening, timeout):
        what = f"{' '.join(args[2:4])} (still to listen: {', '.join(sorted(pending))})"
        raise AssertionError(gave_up(what, proc, timeout, {"stderr": err, "stdout": out}))
    p._logs = {"stderr": err, "stdout": out}
    return p


def start_echo(log: Path | None = None) -> Proc:
    """The echo app on a free loopback port; `urls['echo']` is its http URL."""
    args = [sys.executable, "-m", "services.echo", "--listen", "127.0.0.1:0"]
    if log is not None:
        args += ["--log", str(log)]
    return _spawn(args, ["echo"])


def hostport(url: str) -> str:
    return url.split("://", 1)[1]


def sidecar_config(
    tmp: Path,
    name: str,
    ca: CAProcess,
    spiffe_id: str | None,
    app: str | None = None,
    services: dict | None = None,
    inbound_extra: dict | None = None,
    ca_extra: dict | None = None,
    token: str | None = None,
) -> Path:
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    (folder / "ca-root.pem").write_text(ca.bundle.read_text())
    token = token if token is not None else mint_token(ca.home, spiffe_id)
    (folder / "token").write_text(f"  {token}\n\n")  # whitespace is ignored
    doc: dict = {
        "trust_domain": "cluster.local",
        "ca": {"url": ca.url, "bundle": "ca-root.pem", "token_file": "token", **(ca_extra or {})},
        "admin": {"listen": "127.0.0.1:0"},
        "health": {"listen": "127.0.0.1:0"},
    }
    if app is not None:
        doc["inbound"] = {"listen": "127.0.0.1:0", "app": app, **(inbound_extra or {})}
    if services is not None:
        doc["outbound"] = {"listen": "127.0.0.1:0", "services": services}
    path = folder / "sidecar.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start_sidecar(
    config: Path, wait_ready: bool = True, ready_timeout: float = 20, log_level: str = "INFO"
) -> Proc:
    doc = yaml.safe_load(config.read_text())
    expect = ["admin", "health"] + [k for k in ("inbound", "outbound") if k in doc]
    cmd = [sys.executable, "-m", "sidecar", "--log-level", log_level, "run", "--config"]
    p = _spawn([*cmd, str(config)], expect)
    if wait_ready:
        deadline = time.monotonic() + ready_timeout
        while p.proc.poll() is None and time.monotonic() < deadline:
            try:
                status, _ = admin_get(p, "/ready", timeout=5)
            except OSError:  # not answering (yet): keep asking until the deadline
                status = 0
            if status == 200:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(gave_up("the sidecar", p.proc, ready_timeout, p._logs))
    return p


def admin_get(p: Proc, path: str, method: str = "GET", timeout: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(
        p.urls["admin"] + path, method=method, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def proxy_get(
    sidecar: Proc,
    url: str,
    headers: dict | None = None,
    data: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, bytes, dict]:
    """A plain-HTTP call through the sidecar's outbound proxy, as an app with HTTP_PROXY does."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": sidecar.urls["outbound"]})
    )
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def app_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
