"""Pods on one machine (network namespaces): the app's port is unreachable from another pod,
frontend -> backend with mTLS and policy across pods, and transparent interception for an app
with no proxy settings; the sidecar's uid reaches a checkout below a directory closed to it.
Needs root (CI runs as root); skipped with the reason otherwise."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

LOCAL = Path(__file__).resolve().parents[2] / "deploy" / "local"
sys.path.insert(0, str(LOCAL))
podnet = importlib.import_module("podnet")
podmesh = importlib.import_module("podmesh")
why = podnet.available()
# Not root (or no iproute2/iptables): skipped, and the reason is printed in the summary.
pytestmark = pytest.mark.skipif(why is not None, reason=f"pod tests skipped: {why}")


@pytest.fixture(scope="module")
def mesh():
    net = podnet.PodNet()
    prefix = net.prefix
    try:
        try:
            m = podmesh.build(net)
        except podnet.CannotRun as e:
            pytest.skip(f"pod tests skipped: {e}")
        yield m
    finally:
        net.close()
        assert podnet.leftovers(prefix) == [], "every namespace is removed"


def requests_seen(m):
    path = m.work / "backend-app.requests"
    return path.read_text().splitlines() if path.exists() else []


def test_app_port_unreachable_from_another_pod(mesh):
    before = len(requests_seen(mesh))
    r = mesh.net.exec(
        mesh.outsider,
        ["curl", "-sS", "--max-time", "5", f"http://{mesh.backend.ip}:{podmesh.APP_PORT}/direct"],
    )
    assert r.returncode != 0 and r.stdout == ""
    r = mesh.net.exec(
        mesh.outsider,
        ["curl", "-sS", "--max-time", "5", "-k", f"https://{mesh.backend.ip}:15006/direct"],
    )
    assert r.returncode != 0, "no client certificate, no entry"
    assert len(requests_seen(mesh)) == before


def test_transparent_interception_without_proxy_settings(mesh):
    """The frontend app (uid 1000, no HTTP_PROXY) dials backend's pod IP and app port."""
    r = mesh.net.exec(
        mesh.frontend,
        [
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            f"http://{mesh.backend.ip}:{podmesh.APP_PORT}/hello?x=1",
        ],
        uid=1000,
    )
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    h = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == "/hello" and seen["query"] == "x=1"
    assert h["x-forwarded-client-cert"].endswith(f"URI={podmesh.FRONTEND}")
    assert h["x-forwarded-client-cert"].startswith(f"By={podmesh.BACKEND}")


def test_opaque_tcp_is_intercepted_transparently(mesh):
    """The frontend app runs redis-cli against the cache pod's IP and Redis port, with no
    proxy settings: its sidecar finds the service by SO_ORIGINAL_DST and pipes the bytes
    over mTLS (meshca-tcp); the outsider, without a sidecar, gets nothing."""
    if mesh.cache is None:
        pytest.skip("redis-server is not installed (make deps installs it)")
    cli = ["redis-cli", "-h", mesh.cache.ip, "-p", str(podmesh.REDIS_PORT)]
    r = mesh.net.exec(mesh.frontend, [*cli, "SET", "k", "across pods"], uid=1000, timeout=20)
    assert r.stdout.strip() == "OK", (r.stdout, r.stderr)
    r = mesh.net.exec(mesh.frontend, [*cli, "GET", "k"], uid=1000, timeout=20)
    assert r.stdout.strip() == "across pods", (r.stdout, r.stderr)
    r = mesh.net.exec(mesh.outsider, [*cli, "GET", "k"], timeout=20)
    assert "across pods" not in r.stdout
    log = (mesh.work / "cache-sidecar.log").read_text()
    lines = [json.loads(x) for x in log.splitlines() if x.startswith('{"ts"')]
    assert any(x.get("protocol") == "tcp" and x["peer"] == podmesh.FRONTEND for x in lines)


def test_with_http_proxy_across_pods(mesh):
    r = mesh.net.exec(
        mesh.frontend,
        ["curl", "-sS", "--max-time", "10", "http://backend.default/proxied"],
        uid=1000,
        env={"http_proxy": "http://127.0.0.1:15001"},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == "/proxied"


def test_policy_refuses_other_identities_across_pods(mesh):
    """A CA-issued certificate for another identity reaches backend's sidecar but not its app."""
    work = mesh.work
    r = mesh.net.exec(
        mesh.ca,
        [
            "openssl",
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(work / "o.key"),
            "-subj",
            "/CN=o",
            "-out",
            str(work / "o.csr"),
        ],
    )
    assert r.returncode == 0, r.stderr
    token = podmesh._meshca(
        "token",
        "--home",
        str(work / "ca"),
        "--spiffe-id",
        "spiffe://cluster.local/ns/default/sa/intruder",
    ).strip()
    (work / "o.json").write_text(json.dumps({"csr": (work / "o.csr").read_text()}))
    r = mesh.net.exec(
        mesh.outsider,
        [
            "curl",
            "-sS",
            "--cacert",
            str(work / "backend" / "ca-root.pem"),
            "-H",
            f"Authorization: Bearer {token}",
            "--data-binary",
            f"@{work / 'o.json'}",
            f"https://{mesh.ca.ip}:8443/v1/certificates",
        ],
    )
    assert r.returncode == 0, r.stderr
    (work / "o.pem").write_text(json.loads(r.stdout)["certificate_chain"])
    before = len(requests_seen(mesh))
    r = mesh.net.exec(
        mesh.outsider,
        [
            "curl",
            "-sS",
            "-k",
            "--max-time",
            "10",
            "--cert",
            str(work / "o.pem"),
            "--key",
            str(work / "o.key"),
            f"https://{mesh.backend.ip}:15006/secret",
        ],
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["error"] == "forbidden"
    assert len(requests_seen(mesh)) == before


@pytest.fixture
def closed_dir():
    """A directory only root may enter (as `mktemp -d` makes), holding a tree others may read."""
    top = Path(tempfile.mkdtemp(prefix="closed-"))
    try:
        assert top.stat().st_mode & 0o777 == 0o700
        inner = top / "clone" / "pkg"
        inner.mkdir(parents=True)
        for d in (top / "clone", inner):
            d.chmod(0o755)
        (inner / "code.txt").write_text("readable\n")
        (inner / "code.txt").chmod(0o644)
        yield top
    finally:
        shutil.rmtree(top)


def test_shared_path_below_a_closed_directory(closed_dir):
    """uid 1337 in a pod reads a shared tree below a 0700 directory; on the host the directory
    keeps its mode, other uids still cannot enter it, and no mount is left behind."""
    code = closed_dir / "clone" / "pkg" / "code.txt"
    with podnet.PodNet() as net:
        pod = net.add_pod("p")
        r = net.exec(pod, ["cat", str(code)], uid=podmesh.UID)
        assert r.returncode != 0 and "Permission denied" in r.stderr, "closed before sharing"
        assert net.share([closed_dir / "clone"], podmesh.UID) == [closed_dir]
        r = net.exec(pod, ["cat", str(code)], uid=podmesh.UID)
        assert (r.returncode, r.stdout) == (0, "readable\n"), r.stderr
        outside = subprocess.run(
            ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "cat", str(code)],
            capture_output=True,
            text=True,
        )
        assert outside.returncode != 0, "not shared outside the pod's processes"
        assert closed_dir.stat().st_mode & 0o777 == 0o700
        views = list(Path(tempfile.gettempdir()).glob(f"{net.prefix}-view-*"))
        assert views
    assert str(closed_dir) not in Path("/proc/self/mountinfo").read_text()
    assert [v for v in views if v.exists()] == [], "the stubs are removed"
    assert code.read_text() == "readable\n", "the shared files are untouched"


def test_a_failed_wait_shows_the_end_of_the_log(tmp_path):
    """A process that exits, or never gets ready, is reported with the last 30 lines of its log."""
    log = tmp_path / "p.log"
    with podnet.PodNet() as net:
        pod = net.add_pod("p")
        script = "for i in $(seq 1 100); do echo line $i; done; echo fatal: no config; exit 3"
        proc = net.run(pod, ["sh", "-c", script], log=log)
        with pytest.raises(podnet.PodNetError) as e:
            podmesh.wait(lambda: False, "the thing", proc, log, timeout=60)
        msg = str(e.value)
        assert "the thing exited with status 3" in msg
        assert "line 72\nline 73\n" in msg and "fatal: no config" in msg
        assert "line 71\n" not in msg

        script = "echo starting; echo stuck on something; exec sleep 60"
        proc = net.run(pod, ["sh", "-c", script], log=log)
        with pytest.raises(podnet.PodNetError) as e:
            podmesh.wait(lambda: False, "the thing", proc, log, timeout=1)
        assert "timed out after 1 s waiting for the thing" in str(e.value)
        assert "starting\nstuck on something" in str(e.value)
