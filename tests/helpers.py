"""Shared test helpers: run the real CLI, start the real CA server, call it with real clients."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PEM_RE = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", re.S)
TAIL_LINES = 30


def free_port(udp: bool = False) -> int:
    """A loopback port free now (for TCP, and for UDP too when `udp`), below the kernel's
    ephemeral range: a port chosen here and bound later by a server the test starts cannot
    be handed to another process's bind to port 0 in between (a sidecar of the same rig
    once took, for one of its own listeners, the port kept for its peer's inbound)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        socks = [socket.socket(socket.AF_INET, kind) for kind in kinds]
        try:
            for sock in socks:
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return port
    raise AssertionError(f"no free loopback port below {low} after 200 tries")


def tail(lines: list[str] | str | bytes | None, n: int = TAIL_LINES) -> str:
    """The last `n` lines of a log, for the message of a wait that gave up."""
    if isinstance(lines, bytes):
        lines = lines.decode(errors="replace")
    if isinstance(lines, str) or lines is None:
        lines = (lines or "").splitlines(keepends=True)
    return "".join(lines[-n:]).rstrip("\n") or "(nothing)"


class Lines:
    """The lines a child process writes to one stream, read in the background as they come."""

    def __init__(self, stream: IO[str], into: list[str] | None = None) -> None:
        self.lines = into if into is not None else []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def follow(self, on_line: Callable[[str], bool], timeout: float) -> bool:
        """Give every line, old and new, to `on_line` until it returns True (then True), or
        the stream ends or `timeout` s pass (then False). Never blocks past the timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                while seen < len(self.lines):
                    seen += 1
                    if on_line(self.lines[seen - 1]):
                        return True
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    return False
                self._cond.wait(left)

    def drain(self, timeout: float = 2) -> None:
        """Wait (briefly) until the stream has ended, so that its last lines are in."""
        self._thread.join(timeout)


def gave_up(
    what: str, proc: subprocess.Popen, timeout: float, logs: dict[str, Lines | list[str]]
) -> str:
    """Stop `proc` and say why a wait for it failed, with the last lines of each of its logs."""
    try:
        # A process whose output just ended may not be reaped yet: give it a moment, so
        # that an exit is reported as an exit (with its status), not as a timeout.
        code: int | None = proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        code = None
    why = f"exited with status {code}" if code is not None else f"not ready after {timeout:g} s"
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    parts = [f"{what} {why}"]
    for name, log in logs.items():
        if isinstance(log, Lines):
            log.drain()
            log = log.lines
        parts.append(f"--- last lines of its {name}:\n{tail(log)}")
    return "\n".join(parts)


def run_meshca(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `python -m meshca ARGS` as a user would; return the completed process."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "meshca", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"meshca {' '.join(args)} did not finish within {timeout:g} s\n"
            f"--- last lines of its stderr:\n{tail(e.stderr)}\n"
            f"--- last lines of its stdout:\n{tail(e.stdout)}"
        ) from None
    if check and proc.returncode != 0:
        raise AssertionError(f"meshca {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def mint_token(
    home: Path, spiffe_id: str, ttl: int | None = None, dns: tuple[str, ...] = ()
) -> str:
    args = ["token", "--home", str(home), "--spiffe-id", spiffe_id]
    if ttl is not None:
        args += ["--ttl", str(ttl)]
    for name in dns:
        args += ["--dns", name]
    out = run_meshca(*args).stdout
    assert out.count("\n") == 1, "token must be alone on one line"
    return out.strip()


def ledger_certs(home: Path) -> list[dict]:
    return json.loads(run_meshca("certs", "--home", str(home), "--json").stdout)


def workload_certs(home: Path) -> list[dict]:
    """Ledger rows of workload certificates (not the CA's own serving certificate)."""
    return [c for c in ledger_certs(home) if c["credential"] != "ca_server"]


def refusals(home: Path) -> list[dict]:
    import sqlite3

    db = sqlite3.connect(home / "ledger.db")
    try:
        rows = db.execute(
            "SELECT spiffe_id, credential, code, reason FROM refusals ORDER BY id"
        ).fetchall()
    finally:
        db.close()
    return [dict(zip(("spiffe_id", "credential", "code", "reason"), r, strict=True)) for r in rows]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class CAProcess:
    """A running `meshca serve` child process on a free loopback port."""

    home: Path
    proc: subprocess.Popen
    url: str
    bundle: Path
    stderr_lines: list[str] = field(default_factory=list)
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def host_port(self) -> tuple[str, int]:
        hostport = self.url.removeprefix("https://")
        host, _, port = hostport.rpartition(":")
        return host, int(port)

    def stop(self) -> None:
        stop_process(self.proc)

    @property
    def log(self) -> str:
        return "".join(self.stderr_lines)


def serve_meshca(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 20, what: str = ""
) -> tuple[subprocess.Popen, str, Lines, Lines]:
    """Start `meshca serve --listen 127.0.0.1:0 ARGS` and wait for it to say where it
    listens: (process, URL, its stderr, its stdout). A timeout shows the tail of its logs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshca", "serve", "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    found: list[str] = []

    def serving(line: str) -> bool:
        m = re.search(r"serving on (https://\S+)", line)
        if m:
            found.append(m.group(1))
        return m is not None

    if not out.follow(serving, timeout):
        logs = {"stderr": err, "stdout": out}
        raise AssertionError(gave_up(f"meshca serve {what}".strip(), proc, timeout, logs))
    return proc, found[0], err, out


def start_ca(home: Path, *extra: str, timeout: float = 20) -> CAProcess:
    """Start `meshca serve --home HOME --listen 127.0.0.1:0` and wait until it listens."""
    proc, url, err, out = serve_meshca(["--home", str(home), *extra], timeout=timeout)
    bundle = home.parent / f"{home.name}-bundle.pem"
    bundle.write_text(run_meshca("bundle", "--home", str(home)).stdout)
    return CAProcess(home, proc, url, bundle, err.lines, out.lines)


def openssl_csr(
    tmp: Path, name: str, *key_args: str, extra: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """Make a key and CSR with `openssl req`; return (key path, csr path)."""
    key, csr = tmp / f"{name}.key", tmp / f"{name}.csr"
    if not key_args:
        key_args = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            *key_args,
            "-nodes",
            "-keyout",
            str(key),
            "-subj",
            "/CN=test",
            "-out",
            str(csr),
            *extra,
        ],
        check=True,
        capture_output=True,
    )
    return key, csr


def request_json(csr_pem: str) -> str:
    return json.dumps({"csr": csr_pem})


def curl(ca: CAProcess, path: str, *args: str) -> tuple[int, str, dict[str, str]]:
    """Call the CA with curl; return (status, body, headers). Fails the test on a curl error."""
    try:
        proc = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                str(ca.bundle),
                "-D",
                "-",
                *args,
                ca.url + path,
            ],
            capture_output=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"curl {path} did not finish within 30 s\n"
            f"--- last lines of its stderr:\n{tail(e.stderr)}\n"
            f"--- last lines of the CA's log:\n{tail(ca.stderr_lines)}"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(f"curl failed ({proc.returncode}): {proc.stderr.decode()}")
    head, _, body = proc.stdout.decode().partition("\r\n\r\n")
    while head.split(" ", 2)[1:2] == ["100"]:  # curl's Expect: 100-continue interim answer
        head, _, body = body.partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, body, headers


def curl_enroll(ca: CAProcess, csr: Path, token: str | None, *args: str) -> tuple[int, dict]:
    body = csr.parent / (csr.name + ".json")
    body.write_text(request_json(csr.read_text()))
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    status, text, _ = curl(
        ca,
        "/v1/certificates",
        "-H",
        "Content-Type: application/json",
        *auth,
        "--data-binary",
        f"@{body}",
        *args,
    )
    return status, json.loads(text)


def py_post(
    ca: CAProcess,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    cert: tuple[Path, Path] | None = None,
) -> tuple[int, dict, dict[str, str]]:
    """POST with Python's http.client (a second, independent client)."""
    ctx = ssl.create_default_context(cafile=str(ca.bundle))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    host, port = ca.host_port
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=20)
    try:
        conn.request(
            "POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def split_chain(chain_pem: str) -> list[str]:
    return PEM_RE.findall(chain_pem)
