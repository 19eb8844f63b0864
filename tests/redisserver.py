"""A real Redis for the opaque-TCP tests: redis-server on a free loopback port, nothing kept
on disk, talked to with the real redis-cli (Debian's redis-server, installed by `make deps`)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import free_port, stop_process, tail


class RedisServer:
    """A running redis-server on 127.0.0.1:`port`, logging to `log`."""

    host = "127.0.0.1"

    def __init__(self, port: int, log: Path, proc: subprocess.Popen) -> None:
        self.port = port
        self.log = log
        self.proc = proc

    @property
    def address(self) -> str:
        """`host:port`, as a sidecar's config names an endpoint."""
        return f"{self.host}:{self.port}"

    def cli(
        self, *args: str, port: int | None = None, timeout: float = 10
    ) -> subprocess.CompletedProcess:
        """Run `redis-cli -h 127.0.0.1 -p PORT ARGS` (PORT: this server's, or `port`, e.g. a
        sidecar's listener in front of it); its output is text, its status is not checked."""
        cmd = ["redis-cli", "-h", self.host, "-p", str(port or self.port), *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"{' '.join(cmd)} did not finish within {timeout:g} s\n"
                f"--- last lines of its stderr:\n{tail(e.stderr)}\n"
                f"--- last lines of redis-server's log:\n{self.log_tail()}"
            ) from None

    def log_tail(self) -> str:
        return tail(self.log.read_text(errors="replace") if self.log.exists() else None)

    def stop(self) -> None:
        stop_process(self.proc)


def _start(folder: Path, port: int, timeout: float) -> RedisServer:
    log = folder / f"redis-{port}.log"
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(folder),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",  # standard output, which is `log`
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = RedisServer(port, log, proc)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if server.cli("ping", timeout=2).stdout.strip() == "PONG":
                return server
        except AssertionError:  # a ping that hung: ask again until the deadline
            pass
        time.sleep(0.05)
    why = f"exited with status {proc.returncode}" if proc.poll() is not None else None
    server.stop()
    why = why or f"did not answer PING within {timeout:g} s"
    raise AssertionError(f"redis-server {why}\n--- last lines of its log:\n{server.log_tail()}")


@contextmanager
def redis_server(tmp_path: Path, timeout: float = 10) -> Iterator[RedisServer]:
    """A redis-server with its dir and log in `tmp_path`, answering PING; stopped on exit
    (also when the body fails). Skips the test when redis-server is not installed."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make deps installs it)")
    folder = tmp_path / "redis"
    folder.mkdir(exist_ok=True)
    for attempt in range(3):  # the port may be taken between our look and its bind
        try:
            server = _start(folder, free_port(), timeout)
            break
        except AssertionError as e:
            if attempt == 2 or "Address already in use" not in str(e):
                raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server on a free loopback port, stopped after the test."""
    with redis_server(tmp_path) as server:
        yield server
