"""Pods on one machine: network namespaces joined to a bridge that lives in a namespace of its own.

Needs root. Each "pod" is a network namespace with loopback and one veth
(`eth0`, an address from 10.244.0.0/16) attached to a bridge inside the
harness's own namespace, so nothing is added to the host's namespace and pod
addresses are never routed from the host. Processes started in a pod share its
localhost, like the containers of one pod. `close()` (also at exit, and from a
`with` block that fails) kills every process and deletes every namespace.

    with PodNet() as net:
        backend = net.add_pod("backend")      # -> Pod(ns=..., ip="10.244.0.2")
        net.run(backend, ["python", "-m", "services.echo", "--listen", "127.0.0.1:5000"])
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = ipaddress.ip_network("10.244.0.0/16")


class PodNetError(RuntimeError):
    """The harness could not do what was asked; the message says why."""


def available() -> str | None:
    """None when the harness can run here, else why not (for a skip message)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "iptables", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 iptables util-linux)"
    return None


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise PodNetError(f"ip {' '.join(args)}: {res.stderr.strip()}")


@dataclass
class Pod:
    """One pod: its namespace and address."""

    name: str
    ns: str
    ip: str


@dataclass
class PodNet:
    """The harness: a bridge namespace, pods, and the processes started in them."""

    prefix: str = field(default_factory=lambda: f"mp{os.getpid() % 100000}")
    pods: list[Pod] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)  # removed by close()
    _next_host: int = 2

    def __post_init__(self) -> None:
        self.bridge_ns = f"{self.prefix}-br"
        atexit.register(self.close)
        try:
            _ip("netns", "add", self.bridge_ns)
            self._made.append(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", "lo", "up")
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        except Exception:
            self.close()
            raise

    def __enter__(self) -> PodNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_pod(self, name: str) -> Pod:
        """A new pod namespace with an address on the bridge."""
        ns = f"{self.prefix}-{name}"
        ip = str(SUBNET.network_address + self._next_host)
        self._next_host += 1
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        veth = f"v{len(self.pods)}{name[:8]}"
        # both ends are made inside the bridge's namespace, then one moves into the pod
        _ip(
            "-n",
            self.bridge_ns,
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        _ip("-n", self.bridge_ns, "link", "set", veth, "master", "br0")
        _ip("-n", self.bridge_ns, "link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        pod = Pod(name, ns, ip)
        self.pods.append(pod)
        return pod

    def command(self, pod: Pod, argv: list[str], uid: int | None = None) -> list[str]:
        """The argv that runs `argv` inside `pod` (as `uid` if given)."""
        prefix = ["ip", "netns", "exec", pod.ns]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return [*prefix, *argv]

    def run(
        self,
        pod: Pod,
        argv: list[str],
        uid: int | None = None,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """Start a process in `pod`; it is killed by close()."""
        out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen(
            self.command(pod, argv, uid),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.procs.append(proc)
        return proc

    def exec(
        self,
        pod: Pod,
        argv: list[str],
        uid: int | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command in `pod` to completion."""
        return subprocess.run(
            self.command(pod, argv, uid),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def close(self) -> None:
        """Kill every process and delete every namespace (idempotent)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        for ns in reversed(self._made):
            with contextlib.suppress(PodNetError):
                _ip("netns", "del", ns)
        self._made.clear()
        self.pods.clear()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


def leftovers(prefix: str) -> list[str]:
    """Namespaces with `prefix` still present (for the tests' cleanup check)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]
