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

Processes run as another uid (the sidecar's 1337) must read the code, the venv
and the interpreter, which may sit below a directory closed to that uid (a
checkout under /root, or under `mktemp -d`). `share()` handles that without
touching the user's directories: each process run with that uid gets a private
mount namespace in which the closed directory is covered by a stub of open
directories holding only the shared paths, bind-mounted from the originals.
Other users on the host see nothing new, and the mounts die with the process.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = ipaddress.ip_network("10.244.0.0/16")
_serial = itertools.count(1)


TAIL_LINES = 30

# Run inside `unshare --mount`: bind-mount each (source, target) pair, then exec the command.
_MOUNT_SCRIPT = (
    'while [ "$1" != -- ]; do mount --rbind "$1" "$2" || exit 125; shift 2; done; shift; exec "$@"'
)


class PodNetError(RuntimeError):
    """The harness could not do what was asked; the message says why."""


class CannotRun(PodNetError):
    """Something a pod needs cannot be made to work on this machine (a reason to skip)."""


def available() -> str | None:
    """None when the harness can run here, else why not (for a skip message)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "iptables", "setpriv", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 iptables util-linux mount)"
    return None


def tail(log: Path | None, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log file, for an error message."""
    if log is None:
        return "(no log kept)"
    try:
        text = log.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e.strerror})"
    last = text.splitlines()[-lines:]
    return "\n".join(last) if last else "(log is empty)"


def _text(out: bytes | str | None) -> str:
    if isinstance(out, bytes):
        return out.decode(errors="replace")
    return out or ""


def _can_enter(path: Path, uid: int) -> bool:
    """Whether a process with uid and gid `uid` and no other groups may enter `path`."""
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == uid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def closed_ancestor(path: Path, uid: int) -> Path | None:
    """The top-most directory above `path` that `uid` may not enter, or None."""
    for parent in reversed(path.parents):
        if not _can_enter(parent, uid):
            return parent
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

    # unique per harness, also for two in one process
    prefix: str = field(default_factory=lambda: f"mp{os.getpid() % 100000}-{next(_serial)}")
    pods: list[Pod] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)  # removed by close()
    _next_host: int = 2
    # per uid: (bind mounts of shared paths into stubs, {closed directory: its stub})
    _views: dict[int, tuple[list[tuple[Path, Path]], dict[Path, Path]]] = field(
        default_factory=dict
    )
    _view_dirs: list[Path] = field(default_factory=list)

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

    def share(self, paths: Iterable[Path], uid: int) -> list[Path]:
        """Let processes run as `uid` reach the directories `paths` even below a directory
        closed to `uid`.

        The user's directories keep their modes: processes started with `uid` get
        a private mount namespace in which each closed directory is covered by a
        stub of open directories that holds only the shared paths, bind-mounted
        from the originals. Returns the covered directories (empty: nothing to do).
        Whether `uid` may read the shared directories themselves is up to their modes.
        """
        found = sorted({Path(p).resolve() for p in paths})
        # a path inside another shared path comes with it
        found = [p for p in found if not any(q != p and p.is_relative_to(q) for q in found)]
        binds, covers = self._views.setdefault(uid, ([], {}))
        for path in found:
            closed = closed_ancestor(path, uid)
            if closed is None:
                continue
            if closed not in covers:
                base = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-view-"))
                self._view_dirs.append(base)
                covers[closed] = self._open_dir(base / "stub")
            target = covers[closed]
            for part in path.relative_to(closed).parts:
                target = self._open_dir(target / part)
            if (path, target) not in binds:
                binds.append((path, target))
        return list(covers)

    def _open_dir(self, path: Path) -> Path:
        if not path.exists():
            path.mkdir()
            self._view_dirs.append(path)
        path.chmod(0o755)  # whatever the umask
        return path

    def command(self, pod: Pod, argv: list[str], uid: int | None = None) -> list[str]:
        """The argv that runs `argv` inside `pod` (as `uid` if given)."""
        prefix = ["ip", "netns", "exec", pod.ns]
        if uid is not None:
            binds, covers = self._views.get(uid, ([], {}))
            # the stubs are filled first, while the originals are reachable, then laid over
            mounts = [*binds, *((stub, closed) for closed, stub in covers.items())]
            if mounts:
                pairs = [str(p) for mount in mounts for p in mount]
                prefix += ["unshare", "--mount", "--propagation", "private"]
                prefix += ["sh", "-c", _MOUNT_SCRIPT, "sh", *pairs, "--"]
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
        """Run a command in `pod` to completion (PodNetError if it takes over `timeout` s)."""
        try:
            return subprocess.run(
                self.command(pod, argv, uid),
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, **(env or {})},
            )
        except subprocess.TimeoutExpired as e:
            out = [_text(e.stdout), _text(e.stderr)]
            last = "\n".join("\n".join(out).strip().splitlines()[-TAIL_LINES:])
            raise PodNetError(
                f"{argv[0]} in pod {pod.name} did not finish within {timeout:g} s; "
                f"the last lines of its output:\n{last or '(none)'}"
            ) from None

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
        # rmdir, never rmtree: should a bind mount ever show on the host, the user's files stay
        for d in reversed(self._view_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._view_dirs.clear()
        self._views.clear()


def leftovers(prefix: str) -> list[str]:
    """Namespaces of the harness with `prefix` still present (for the tests' cleanup check)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{prefix}-")]
