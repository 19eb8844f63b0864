"""A small mesh in network-namespace pods: the CA, backend (echo app + sidecar) and frontend
(sidecar with transparent interception), plus a pod with no sidecar. Used by the pod tests and
by `make demo-pods` (`python deploy/local/podmesh.py`).

In each pod the sidecar runs as uid 1337 and `sidecar init-net` installs the
interception rules, as istio-init does; the apps listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from podnet import Pod, PodNet  # noqa: E402

PY = sys.executable
BACKEND = "spiffe://cluster.local/ns/default/sa/backend"
FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
APP_PORT = 5000
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

    def close(self) -> None:
        self.net.close()


def _wait(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


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

    home = work / "ca"
    _meshca("init", "--home", str(home))
    net.run(
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
    _wait(lambda: "serving on" in (work / "ca.log").read_text(), "the CA")
    bundle = _meshca("bundle", "--home", str(home))
    ca_url = f"https://{ca_pod.ip}:8443"

    # backend: the app on 127.0.0.1, its sidecar, interception of the app port
    net.run(
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
    net.run(
        backend,
        [PY, "-m", "sidecar", "run", "--config", str(bdir / "sidecar.yaml")],
        uid=UID,
        log=work / "backend-sidecar.log",
    )

    # frontend: its sidecar intercepts the app's outgoing TCP (no HTTP_PROXY needed)
    fdir = _sidecar_dir(
        work,
        "frontend",
        {
            "ca": {"url": ca_url, "bundle": "ca-root.pem", "token_file": "token"},
            "outbound": {
                "listen": "127.0.0.1:15001",
                "services": {
                    "backend.default": {
                        "endpoints": [f"{backend.ip}:15006"],
                        "identity": BACKEND,
                        "addresses": [f"{backend.ip}:{APP_PORT}"],
                    }
                },
            },
            "admin": {"listen": "127.0.0.1:15000"},
            "health": {"listen": "0.0.0.0:15021"},
        },
        _meshca("token", "--home", str(home), "--spiffe-id", FRONTEND).strip(),
        bundle,
    )
    res = net.exec(frontend, [PY, "-m", "sidecar", "init-net", "--uid", str(UID)])
    if res.returncode != 0:
        raise RuntimeError(f"init-net (frontend): {res.stderr}")
    net.run(
        frontend,
        [PY, "-m", "sidecar", "run", "--config", str(fdir / "sidecar.yaml")],
        uid=UID,
        log=work / "frontend-sidecar.log",
    )

    def ready(pod: Pod) -> bool:
        r = net.exec(pod, ["curl", "-sf", "http://127.0.0.1:15000/ready"], timeout=10)
        return r.returncode == 0

    _wait(lambda: ready(backend), "backend's sidecar")
    _wait(lambda: ready(frontend), "frontend's sidecar")
    return PodMesh(net, work, ca_pod, backend, frontend, outsider)


def demo() -> int:
    """`make demo-pods`: show the pods to a person, then remove everything."""
    from podnet import available

    why = available()
    if why:
        print(f"demo-pods: skipped: {why}")
        return 0
    with PodNet() as net:
        mesh = build(net)
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
