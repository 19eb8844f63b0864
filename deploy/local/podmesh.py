"""A small mesh in network-namespace pods: the CA, backend (echo app + sidecar) and frontend
(sidecar with transparent interception), plus a pod with no sidecar and, when redis-server
is installed, a cache pod (Redis behind a sidecar with `app_protocol: tcp`). Used by the pod
tests and by `make demo-pods` (`python deploy/local/podmesh.py`).

In each pod the sidecar runs as uid 1337 and `sidecar init-net` installs the
interception rules, as istio-init does; the apps listen on 127.0.0.1 only. The
checkout, the venv and the interpreter are shared with uid 1337 (see
`PodNet.share`), so this works from a checkout that other users cannot enter;
a wait that gives up says why, with the end of the log of what it waited for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from podnet import CannotRun, Pod, PodNet, PodNetError, tail  # noqa: E402

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]  # the checkout: meshca/, sidecar/, services/
BACKEND = "spiffe://cluster.local/ns/default/sa/backend"
FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
CACHE = "spiffe://cluster.local/ns/default/sa/cache"
APP_PORT = 5000
REDIS_PORT = 6379
UID = 1337


@dataclass
class PodMesh:
    """The running pods and where things are."""

    net: PodNet
    work: Path
    ca: Pod
    backend: Pod
    frontend: Pod
    outsider: Pod
    cache: Pod | None = None  # Redis behind a tcp sidecar (None: redis-server not installed)

    def close(self) -> None:
        self.net.close()


def wait(
    check: Callable[[], bool],
    what: str,
    proc: subprocess.Popen,
    log: Path | None,
    timeout: float = 30,
) -> None:
    """Wait until `check()` holds; raise with the end of `log` if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        code = proc.poll()
        if code is not None:
            raise PodNetError(
                f"{what} exited with status {code}; the last lines of {log}:\n{tail(log)}"
            )
        if time.monotonic() >= deadline:
            raise PodNetError(
                f"timed out after {timeout:g} s waiting for {what}; "
                f"the last lines of {log}:\n{tail(log)}"
            )
        time.sleep(0.1)


def share_code(net: PodNet, pod: Pod, uid: int = UID) -> None:
    """Make the code, venv and interpreter readable to `uid` in `net`'s pods, and check it.

    Raises CannotRun, saying why, when `uid` still cannot import the sidecar
    (for example a checkout made with umask 077, whose files only root may read).
    """
    covered = net.share(
        [ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(PY).resolve().parent], uid
    )
    res = net.exec(pod, [PY, "-c", "import meshca.cli, sidecar.cli, yaml"], uid=uid)
    if res.returncode != 0:
        how = f" (shared past {', '.join(map(str, covered))})" if covered else ""
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CannotRun(
            f"uid {uid} cannot run the sidecar from {ROOT} with {PY}{how}: {last} "
            "(are the files readable by others? a checkout made with umask 077 is not)"
        )


def _meshca(*args: str) -> str:
    out = subprocess.run([PY, "-m", "meshca", *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"meshca {args[0]}: {out.stderr}")
    return out.stdout


def _sidecar_dir(work: Path, name: str, doc: dict, token: str, bundle: str) -> Path:
    d = work / name
    d.mkdir(mode=0o755)
    (d / "ca-root.pem").write_text(bundle)
    (d / "token").write_text(token)
    (d / "sidecar.yaml").write_text(yaml.safe_dump(doc))
    for f in d.iterdir():
        f.chmod(0o644)  # read by the sidecar's uid
    return d


def build(net: PodNet, policy: dict | None = None) -> PodMesh:
    """Start everything; raise (the caller closes `net`) if anything does not come up."""
    work = Path(tempfile.mkdtemp(prefix="podmesh-", dir="/tmp"))
    work.chmod(0o755)
    net.dirs.append(work)
    ca_pod = net.add_pod("meshca")
    backend = net.add_pod("backend")
    frontend = net.add_pod("frontend")
    outsider = net.add_pod("outsider")
    cache = net.add_pod("cache") if shutil.which("redis-server") else None
    share_code(net, backend)

    home = work / "ca"
    _meshca("init", "--home", str(home))
    ca_proc = net.run(
        ca_pod,
        [
            PY,
            "-m",
            "meshca",
            "serve",
            "--home",
            str(home),
            "--listen",
            "0.0.0.0:8443",
            "--server-name",
            ca_pod.ip,
        ],
        log=work / "ca.log",
    )
    wait(lambda: "serving on" in (work / "ca.log").read_text(), "the CA", ca_proc, work / "ca.log")
    bundle = _meshca("bundle", "--home", str(home))
    ca_url = f"https://{ca_pod.ip}:8443"

    # backend: the app on 127.0.0.1, its sidecar, interception of the app port
    app = net.run(
        backend,
        [
            PY,
            "-m",
            "services.echo",
            "--listen",
            f"127.0.0.1:{APP_PORT}",
            "--log",
            str(work / "backend-app.requests"),
        ],
        log=work / "backend-app.log",
    )
    app_log = work / "backend-app.log"
    wait(lambda: "listening on" in app_log.read_text(), "backend's app", app, app_log)
    policy_doc = policy or {
        "rules": [{"name": "frontend-only", "action": "ALLOW", "from": {"principals": [FRONTEND]}}]
    }
    bdir = _sidecar_dir(
        work,
        "backend",
        {
            "ca": {"url": ca_url, "bundle": "ca-root.pem", "token_file": "token"},
            "inbound": {"listen": "0.0.0.0:15006", "app": f"127.0.0.1:{APP_PORT}"},
            "policy": {"file": "policy.yaml"},
            "admin": {"listen": "127.0.0.1:15000"},
            "health": {"listen": "0.0.0.0:15021"},
        },
        _meshca("token", "--home", str(home), "--spiffe-id", BACKEND).strip(),
        bundle,
    )
    (bdir / "policy.yaml").write_text(yaml.safe_dump(policy_doc))
    (bdir / "policy.yaml").chmod(0o644)
    res = net.exec(
        backend, [PY, "-m", "sidecar", "init-net", "--app-port", str(APP_PORT), "--uid", str(UID)]
    )
    if res.returncode != 0:
        raise RuntimeError(f"init-net (backend): {res.stderr}")
    backend_sidecar = net.run(
        backend,
        [PY, "-m", "sidecar", "run", "--config", str(bdir / "sidecar.yaml")],
        uid=UID,
        log=work / "backend-sidecar.log",
    )

    services: dict = {
        "backend.default": {
            "endpoints": [f"{backend.ip}:15006"],
            "identity": BACKEND,
            "addresses": [f"{backend.ip}:{APP_PORT}"],
        }
    }
    cache_sidecar = None
    if cache is not None:
        cache_sidecar = _start_cache(net, work, cache, ca_url, home, bundle)
        services["cache.default"] = {
            "endpoints": [f"{cache.ip}:15006"],
            "identity": CACHE,
            "protocol": "tcp",
            "addresses": [f"{cache.ip}:{REDIS_PORT}"],
        }

    # frontend: its sidecar intercepts the app's outgoing TCP (no HTTP_PROXY needed)
    fdir = _sidecar_dir(
        work,
        "frontend",
        {
            "ca": {"url": ca_url, "bundle": "ca-root.pem", "token_file": "token"},
            "outbound": {"listen": "127.0.0.1:15001", "services": services},
            "admin": {"listen": "127.0.0.1:15000"},
            "health": {"listen": "0.0.0.0:15021"},
        },
        _meshca("token", "--home", str(home), "--spiffe-id", FRONTEND).strip(),
        bundle,
    )
    res = net.exec(frontend, [PY, "-m", "sidecar", "init-net", "--uid", str(UID)])
    if res.returncode != 0:
        raise RuntimeError(f"init-net (frontend): {res.stderr}")
    frontend_sidecar = net.run(
        frontend,
        [PY, "-m", "sidecar", "run", "--config", str(fdir / "sidecar.yaml")],
        uid=UID,
        log=work / "frontend-sidecar.log",
    )

    def ready(pod: Pod) -> bool:
        try:
            r = net.exec(pod, ["curl", "-sf", "http://127.0.0.1:15000/ready"], timeout=10)
        except PodNetError:  # curl itself hung: try again until the deadline
            return False
        return r.returncode == 0

    wait(
        lambda: ready(backend),
        "backend's sidecar",
        backend_sidecar,
        work / "backend-sidecar.log",
    )
    wait(
        lambda: ready(frontend),
        "frontend's sidecar",
        frontend_sidecar,
        work / "frontend-sidecar.log",
    )
    if cache is not None and cache_sidecar is not None:
        wait(lambda: ready(cache), "cache's sidecar", cache_sidecar, work / "cache-sidecar.log")
    return PodMesh(net, work, ca_pod, backend, frontend, outsider, cache)


def _start_cache(
    net: PodNet, work: Path, cache: Pod, ca_url: str, home: Path, bundle: str
) -> subprocess.Popen:
    """Redis on the cache pod's loopback, its sidecar (`app_protocol: tcp`, frontend only),
    the interception of its port."""
    data = work / "redis"
    data.mkdir(mode=0o777)
    redis = net.run(
        cache,
        [
            "redis-server", "--bind", "127.0.0.1", "--port", str(REDIS_PORT),
            "--save", "", "--appendonly", "no", "--dir", str(data),
        ],
        log=work / "redis.log",
    )  # fmt: skip

    def pong() -> bool:
        r = net.exec(cache, ["redis-cli", "-p", str(REDIS_PORT), "ping"], timeout=10)
        return r.stdout.strip() == "PONG"

    wait(pong, "redis-server", redis, work / "redis.log")
    cdir = _sidecar_dir(
        work,
        "cache",
        {
            "ca": {"url": ca_url, "bundle": "ca-root.pem", "token_file": "token"},
            "inbound": {
                "listen": "0.0.0.0:15006",
                "app": f"127.0.0.1:{REDIS_PORT}",
                "app_protocol": "tcp",
            },
            "policy": {"file": "policy.yaml"},
            "admin": {"listen": "127.0.0.1:15000"},
            "health": {"listen": "0.0.0.0:15021"},
        },
        _meshca("token", "--home", str(home), "--spiffe-id", CACHE).strip(),
        bundle,
    )
    rules = {"rules": [{"name": "frontend", "action": "ALLOW", "from": {"principals": [FRONTEND]}}]}
    (cdir / "policy.yaml").write_text(yaml.safe_dump(rules))
    (cdir / "policy.yaml").chmod(0o644)
    res = net.exec(
        cache, [PY, "-m", "sidecar", "init-net", "--app-port", str(REDIS_PORT), "--uid", str(UID)]
    )
    if res.returncode != 0:
        raise RuntimeError(f"init-net (cache): {res.stderr}")
    return net.run(
        cache,
        [PY, "-m", "sidecar", "run", "--config", str(cdir / "sidecar.yaml")],
        uid=UID,
        log=work / "cache-sidecar.log",
    )


def demo() -> int:
    """`make demo-pods`: show the pods to a person, then remove everything."""
    from podnet import available

    why = available()
    if why:
        print(f"demo-pods: skipped: {why}")
        return 0
    with PodNet() as net:
        try:
            mesh = build(net)
        except CannotRun as e:
            print(f"demo-pods: cannot run here: {e}")
            return 1
        print(
            f"pods: meshca {mesh.ca.ip}, backend {mesh.backend.ip}, frontend "
            f"{mesh.frontend.ip}, outsider {mesh.outsider.ip} (netns {net.prefix}-*)"
        )
        print(
            f"\n== frontend's app calls http://{mesh.backend.ip}:{APP_PORT}/ with no proxy "
            "settings; its sidecar intercepts it and speaks mTLS to backend's sidecar"
        )
        r = net.exec(
            mesh.frontend, ["curl", "-sS", f"http://{mesh.backend.ip}:{APP_PORT}/hi"], uid=1000
        )
        seen = json.loads(r.stdout)
        xfcc = {k.lower(): v for k, v in seen["headers"].items()}["x-forwarded-client-cert"]
        print("backend's app saw X-Forwarded-Client-Cert:", xfcc)
        print("\n== the outsider pod (no sidecar, no certificate) tries backend's app port")
        r = net.exec(
            mesh.outsider,
            ["curl", "-sS", "--max-time", "5", f"http://{mesh.backend.ip}:{APP_PORT}/"],
        )
        print(f"curl exit {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
        print("\n== sidecar identity in the backend pod")
        print(net.exec(mesh.backend, [PY, "-m", "sidecar", "identity"]).stdout)
    print("everything removed")
    return 0


if __name__ == "__main__":
    sys.exit(demo())
