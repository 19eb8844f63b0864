"""A two-pod mesh for root-rotation tests with realistic timing.

Leaves live an hour, so nothing renews by accident during a test: every renewal
is one the test asked for. Each pod is an echo app behind a sidecar that has an
inbound listener (mTLS, a CA JWT-SVID required, keys from the CA's JWKS over
TLS) and an outbound route to the other pod. Listen ports are fixed, so a pod
can be restarted (re-enrolled with a new join token) where its peer expects it.
Each outbound route exists under several names with a JWT audience of its own,
so that a route not used before makes the sidecar fetch a new JWT-SVID from the
CA at that moment.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time
from pathlib import Path

import yaml
from helpers import (  # free_port: also imported from here by the rig's users
    curl_enroll,
    free_port,
    mint_token,
    openssl_csr,
    run_meshca,
    start_ca,
    tail,
)
from mesh import Proc, admin_get, hostport, sidecar_config, start_echo, start_sidecar

from meshca.authority import Authority

IDS = {
    "alpha": "spiffe://cluster.local/ns/shop/sa/alpha",
    "beta": "spiffe://cluster.local/ns/shop/sa/beta",
}
AUDIENCES = [f"aud-{i}" for i in range(24)]
ROTATOR = "spiffe://cluster.local/ns/mesh-system/sa/meshca-rotator"  # the CronJob's identity
LEAF_TTL = "3600"  # an hour: longer than any test, so nothing renews unless asked


def wait_for(what: str, check, timeout: float, logs: list[Proc] | tuple = ()) -> None:
    """Wait until `check()` is true; on timeout fail with the tail of every log involved."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    shown = "\n".join(f"--- {getattr(p, 'name', '?')}:\n{tail(p.stderr)}" for p in logs)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{shown}")


class Rig:
    """CA + pods alpha and beta. `calls` counts every call made; `failed` lists the failures."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "ca"
        self.procs: list = []
        self.calls = 0
        self.failed: list[str] = []
        self.next_audience = dict.fromkeys(IDS, 1)  # per sidecar: its JWT-SVID cache is its own
        run_meshca("init", "--home", str(self.home))
        self.apps = {}
        self.configs: dict[str, Path] = {}
        self.sidecars: dict[str, Proc] = {}
        try:  # the test's own `finally` cannot stop what a failed constructor started
            self.ca = start_ca(
                self.home,
                *("--cert-ttl", LEAF_TTL, "--reload-interval", "0.2", "--burst", "100"),
                *("--admin-id", ROTATOR),
            )
            self.procs.append(self.ca)
            self.ports = {name: free_port() for name in IDS}
            for name in IDS:
                app = start_echo(root / f"{name}-app.log")
                self.procs.append(app)
                self.apps[name] = app
            for name in IDS:
                self.configs[name] = self._config(name)
                self.sidecars[name] = self._start(name)
        except BaseException:
            self.stop()
            raise

    # -- set-up ---------------------------------------------------------------

    def _config(self, name: str) -> Path:
        peer = next(n for n in IDS if n != name)
        services = {
            f"{peer}-{aud}.shop": {
                "endpoints": [f"127.0.0.1:{self.ports[peer]}"],
                "identity": IDS[peer],
                "jwt_audience": aud,
            }
            for aud in AUDIENCES
        }
        cfg = sidecar_config(
            self.root,
            name,
            self.ca,
            IDS[name],
            app=hostport(self.apps[name].urls["echo"]),
            services=services,
            ca_extra={"bundle_poll": 0.3, "retry_max": 1},
        )
        doc = yaml.safe_load(cfg.read_text())
        doc["inbound"]["listen"] = f"127.0.0.1:{self.ports[name]}"
        doc["jwt"] = {
            "issuers": [
                {
                    "issuer": "meshca/cluster.local",
                    "audiences": AUDIENCES,
                    "jwks_uri": self.ca.url + "/v1/jwks",  # trusted through the mesh bundle
                    "jwks_refresh": 1,
                    "jwks_min_interval": 0,
                    "claims_header": "x-jwt-claims",
                }
            ]
        }
        cfg.write_text(yaml.safe_dump(doc))
        return cfg

    def _start(self, name: str) -> Proc:
        p = start_sidecar(self.configs[name])
        p.name = name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    # -- what the operator does ----------------------------------------------

    def rotate(self, *args: str) -> dict:
        out = run_meshca("rotate", "--home", str(self.home), "--json", *args)
        return json.loads(out.stdout)

    def rotator_credentials(self) -> tuple[Path, Path]:
        """A client certificate for the rotation CronJob's identity (openssl + curl)."""
        key, csr = openssl_csr(self.root, "rotator")
        code, doc = curl_enroll(self.ca, csr, mint_token(self.home, ROTATOR))
        assert code == 200, doc
        chain = self.root / "rotator.pem"
        chain.write_text(doc["certificate_chain"])
        return chain, key

    def authority(self) -> Authority:
        return Authority.load(self.home)

    def bootstrap_pem(self, name: str) -> str:
        return (self.root / name / "ca-root.pem").read_text()

    def stop_pod(self, name: str) -> None:
        p = self.sidecars.pop(name)
        p.stop()
        self.procs.remove(p)

    def reenroll(self, name: str) -> None:
        """Restart the pod's sidecar: a new key, a new join token, the same bootstrap file."""
        if name in self.sidecars:
            self.stop_pod(name)
        (self.root / name / "token").write_text(mint_token(self.home, IDS[name]) + "\n")
        self.sidecars[name] = self._start(name)
        self.next_audience[name] = 1

    # -- what the test looks at -----------------------------------------------

    def status(self, name: str) -> dict:
        code, doc = admin_get(self.sidecars[name], "/status")
        assert code == 200, doc
        return doc

    def identity(self, name: str) -> dict:
        code, doc = admin_get(self.sidecars[name], "/identity")
        assert code == 200, doc
        return doc

    def wait_bundle(self, sequence: int) -> None:
        """Every running sidecar's bundle poll has published `sequence`."""
        for name, p in self.sidecars.items():
            wait_for(
                f"{name}'s bundle sequence {sequence}",
                lambda name=name: self.status(name)["bundle"]["sequence"] == sequence,
                15,
                [p, self.ca],
            )

    def wait_ca_serving_under(self, root_pem: str) -> None:
        """The CA has reloaded and serves a certificate that chains to `root_pem` only."""

        def serving() -> bool:
            ctx = ssl.create_default_context(cadata=root_pem)
            host, port = self.ca.host_port
            try:
                with socket.create_connection((host, port), timeout=5) as raw:
                    with ctx.wrap_socket(raw, server_hostname=host):
                        return True
            except ssl.SSLError:
                return False

        wait_for("the CA to serve under the new root", serving, 15, [self.ca])

    def renew(self, name: str) -> dict:
        """`sidecar rotate` as an operator runs it with kubectl exec: must answer 200."""
        code, doc = admin_get(self.sidecars[name], "/rotate", "POST")
        assert code == 200, f"{name} rotate: {doc}\n{tail(self.sidecars[name].stderr)}"
        return doc

    def call(self, src: str, fresh_jwt: bool = False, n: int = 4) -> None:
        """Calls from `src`'s app to the other pod through both sidecars, each with a CA
        JWT-SVID; with `fresh_jwt`, on a route never used before (a new JWT-SVID fetch)."""
        dst = next(x for x in IDS if x != src)
        if fresh_jwt:
            aud = AUDIENCES[self.next_audience[src]]
            self.next_audience[src] += 1
        else:
            aud = AUDIENCES[0]
        host, port = hostport(self.sidecars[src].urls["outbound"]).split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=20)  # kept alive
        try:
            for i in range(n):
                self.calls += 1
                try:
                    conn.request("GET", f"http://{dst}-{aud}.shop/call/{i}")
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    self.failed.append(f"{src}->{dst} {aud}: {e!r}")
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=20)
                    continue
                if resp.status != 200:
                    self.failed.append(f"{src}->{dst} {aud}: {resp.status} {body[:200]!r}")
                    continue
                seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
                claims = json.loads(base64.urlsafe_b64decode(seen["x-jwt-claims"] + "=="))
                if claims.get("sub") != IDS[src] or claims.get("aud") != aud:
                    self.failed.append(f"{src}->{dst}: app saw claims {claims}")
                if f"URI={IDS[src]}" not in seen.get("x-forwarded-client-cert", ""):
                    self.failed.append(f"{src}->{dst}: XFCC {seen.get('x-forwarded-client-cert')}")
        finally:
            conn.close()

    def call_both_ways(self, fresh_jwt: bool = False) -> None:
        for src in IDS:
            if src in self.sidecars:
                self.call(src, fresh_jwt)

    def no_errors_logged(self) -> None:
        """Nothing went wrong quietly: no failed JWKS fetch, bundle poll or renewal."""
        for name, p in self.sidecars.items():
            for bad in ("JWKS fetch from", "bundle poll failed", "certificate manager error"):
                assert bad not in p.stderr, f"{name}: {bad!r} in its log:\n{tail(p.stderr)}"
