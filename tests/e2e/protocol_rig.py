"""The rig of the protocol tests (gRPC, WebSocket, opaque TCP): a CA, and sidecars a test
describes by their identity, their app and what they call.

`Rig.sidecar` writes a config with `mesh.sidecar_config` plus what the test adds
(`app_protocol`, a policy, JWT issuers), starts it and waits until it is ready;
everything started is stopped by `Rig.stop`, also when a start fails.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from helpers import run_meshca, start_ca
from mesh import Proc, hostport, sidecar_config, start_sidecar

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
INTRUDER = "spiffe://cluster.local/ns/other/sa/intruder"


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Rig:
    """A CA and the processes a test starts around it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list = []
        self.home = root / "ca"
        run_meshca("init", "--home", str(self.home))
        self.ca = start_ca(self.home)
        self.procs.append(self.ca)

    def add(self, proc):  # noqa: ANN001, ANN201 (anything with stop())
        self.procs.append(proc)
        return proc

    def sidecar(
        self,
        name: str,
        spiffe_id: str,
        app: str | None = None,
        inbound: dict | None = None,
        services: dict | None = None,
        policy: dict | None = None,
        jwt: bool = False,
        outbound: dict | None = None,
        metrics: bool = False,
        ca_extra: dict | None = None,
    ) -> Proc:
        """Start a sidecar for `spiffe_id`: inbound in front of `app` (`inbound` adds
        keys), outbound to `services`, with a policy document and the CA as JWT issuer."""
        cfg = sidecar_config(
            self.root,
            name,
            self.ca,
            spiffe_id,
            app=app,
            services=services,
            inbound_extra=inbound,
            ca_extra=ca_extra,
        )
        doc = yaml.safe_load(cfg.read_text())
        if policy is not None:
            (cfg.parent / "policy.yaml").write_text(yaml.safe_dump(policy))
            doc["policy"] = {"file": "policy.yaml", "reload_interval": 0.5}
        if jwt:
            doc["jwt"] = {
                "issuers": [
                    {
                        "issuer": "meshca/cluster.local",
                        "audiences": [name],
                        "jwks_uri": self.ca.url + "/v1/jwks",
                    }
                ]
            }
        if metrics:
            doc["metrics"] = {"listen": "127.0.0.1:0"}
        if outbound:
            doc.setdefault("outbound", {"listen": "127.0.0.1:0"}).update(outbound)
        cfg.write_text(yaml.safe_dump(doc))
        return self.add(start_sidecar(cfg))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def inbound_of(p: Proc) -> str:
    """`host:port` of a sidecar's inbound listener."""
    return hostport(p.urls["inbound"])


def outbound_of(p: Proc) -> str:
    """`host:port` of a sidecar's outbound listener."""
    return hostport(p.urls["outbound"])


def access_log(p: Proc, direction: str | None = None) -> list[dict]:
    """The sidecar's access-log lines so far (flushed at least every second)."""
    out = []
    for line in list(p.lines):
        if line.startswith('{"ts"'):
            doc = json.loads(line)
            if direction is None or doc["direction"] == direction:
                out.append(doc)
    return out


def logged(
    p: Proc, direction: str, match: Callable[[dict], bool], timeout: float = 5.0
) -> list[dict]:
    """The access-log lines of `direction` that `match`, once there is at least one: a line
    is written when its exchange ends (after the client may already have its answer) and
    the log is flushed at least every second. AssertionError with the log's tail if none
    comes within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = [r for r in access_log(p, direction) if match(r)]
        if got or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert got, f"no matching {direction} access-log line in {timeout:g} s:\n" + "\n".join(
        list(p.lines)[-30:]
    )
    return got


def scrape(p: Proc) -> str:
    """The sidecar's /metrics page (Prometheus text)."""
    with urllib.request.urlopen(p.urls["metrics"] + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def sample(page: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for line in page.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
