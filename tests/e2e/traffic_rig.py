"""The rig of the traffic-management tests: three named backends, each an app behind its own
sidecar, and one frontend sidecar whose outbound services list the backends' sidecars.

Backends `a` and `b` carry the label `version: v1`, `c` carries `version: v2`. Each app
(tests/e2e/traffic_app.py) answers with its name, records what it received, and can be
told to fail or to be slow; a backend's sidecar can be killed (`healthy` starts it again
on its port, before the next test). A test module
gives the frontend's services as a function of the three endpoints; `Client` calls them
through the frontend's outbound listener over one kept-alive connection.
"""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conftest import BACKEND, FRONTEND
from helpers import run_meshca, start_ca
from mesh import Proc, _spawn, hostport, sidecar_config, start_sidecar
from rotation_rig import free_port

APP = Path(__file__).with_name("traffic_app.py")
VERSIONS = {"a": "v1", "b": "v1", "c": "v2"}


def start_app(name: str, port: int = 0) -> Proc:
    return _spawn(
        [sys.executable, str(APP), "--name", name, "--listen", f"127.0.0.1:{port}"], ["app"]
    )


def mint_tokens(home: Path, ids: dict[str, str]) -> dict[str, str]:
    """A join token for each of `ids` (name: SPIFFE ID), from `meshca token` run in one
    process (one interpreter start instead of one per token)."""
    script = (
        "import sys\nfrom meshca.cli import main\n"
        "for sid in sys.argv[2:]:\n    main(['token', '--home', sys.argv[1], '--spiffe-id', sid])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(home), *ids.values()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert len(out) == len(ids), out
    return dict(zip(ids, out, strict=True))


def _json(url: str, data: dict | None = None) -> object:
    body = None if data is None else json.dumps(data).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as resp:
        return json.loads(resp.read())


class Backend:
    """One app and its sidecar; `inbound` is the address the frontend dials."""

    def __init__(self, name: str, app: Proc, sidecar: Proc) -> None:
        self.name = name
        self.version = VERSIONS[name]
        self.app = app
        self.sidecar = sidecar
        self.port = int(app.urls["app"].rsplit(":", 1)[1])
        self.inbound = hostport(sidecar.urls["inbound"])  # as the frontend's log names it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mode(self, status: int = 200, delay: float = 0) -> None:
        """How the app answers from now on."""
        _json(self.url + "/_ctl/mode", {"status": status, "delay": delay})

    def log(self) -> list[dict]:
        """What the app received, in order."""
        return _json(self.url + "/_ctl/log")  # type: ignore[return-value]

    def count(self, prefix: str = "/") -> int:
        return sum(1 for r in self.log() if r["path"].startswith(prefix))

    def kill_sidecar(self) -> None:
        """SIGKILL: its connections are reset, its inbound port refuses connections."""
        self.sidecar.proc.kill()
        self.sidecar.proc.wait(timeout=10)


Services = Callable[[list[dict]], dict]


class TrafficMesh:
    """CA, backends a, b, c (apps behind their sidecars) and the frontend sidecar."""

    def __init__(self, root: Path, services: Services) -> None:
        self.root = root
        self.procs: list = []
        try:
            self._start(services)
        except BaseException:
            self.stop()
            raise

    def _start(self, services: Services) -> None:
        home = self.root / "ca"
        run_meshca("init", "--home", str(home))
        # Everything that does not wait for something else starts at once (a third of
        # the time, on two cores): the CA, the apps, the join tokens; then the sidecars,
        # the backends' on inbound ports chosen here so that the frontend can list them.
        ids = {**dict.fromkeys(VERSIONS, BACKEND), "frontend": FRONTEND}
        first = {"ca": lambda: start_ca(home)}
        first.update({f"app {n}": lambda n=n: start_app(n) for n in VERSIONS})
        first["tokens"] = lambda: mint_tokens(home, ids)
        got = self._parallel(first)
        tokens: dict[str, str] = got["tokens"]  # type: ignore[assignment]
        self.ca = got["ca"]
        ports = {n: free_port() for n in VERSIONS}
        eps = [
            {"address": f"127.0.0.1:{ports[n]}", "labels": {"version": v}}
            for n, v in VERSIONS.items()
        ]
        svcs = {name: {"identity": BACKEND, **cfg} for name, cfg in services(eps).items()}
        configs = {
            n: sidecar_config(
                self.root,
                n,
                self.ca,
                None,
                app=hostport(got[f"app {n}"].urls["app"]),
                inbound_extra={"listen": f"127.0.0.1:{ports[n]}"},
                token=tokens[n],
            )
            for n in VERSIONS
        }
        configs["frontend"] = sidecar_config(
            self.root, "frontend", self.ca, None, services=svcs, token=tokens["frontend"]
        )
        got.update(self._parallel({n: lambda c=c: start_sidecar(c) for n, c in configs.items()}))
        self.frontend = got["frontend"]
        self.backends = {n: Backend(n, got[f"app {n}"], got[n]) for n in VERSIONS}
        self.a, self.b, self.c = (self.backends[n] for n in VERSIONS)

    def _parallel(self, starts: dict[str, Callable[[], object]]) -> dict[str, object]:
        """Run every start in its own thread; what started is stopped with the mesh."""
        got: dict[str, object] = {}
        errors: list[BaseException] = []

        def run(name: str) -> None:
            try:
                got[name] = result = starts[name]()
            except BaseException as e:  # raised below, once every start has ended
                errors.append(e)
                return
            if hasattr(result, "stop"):
                self.procs.append(result)

        threads = [threading.Thread(target=run, args=(n,)) for n in starts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return got

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def healthy(self) -> None:
        """Every app answers 200 at once again; a sidecar a test killed runs again, on the
        same inbound port (with a new join token: the first one is spent)."""
        for b in self.backends.values():
            b.mode()
            if b.sidecar.proc.poll() is not None:
                folder = self.root / b.name
                (folder / "token").write_text(
                    mint_tokens(self.root / "ca", {b.name: BACKEND})[b.name]
                )
                b.sidecar = start_sidecar(folder / "sidecar.yaml")
                self.procs.append(b.sidecar)

    def by_inbound(self) -> dict[str, str]:
        """Backend name by the address the frontend's access log names."""
        return {b.inbound: b.name for b in self.backends.values()}

    def client(self) -> Client:
        return Client(self.frontend)

    def outbound_log(self, prefix: str, count: int, timeout: float = 5) -> list[dict]:
        """The frontend's access-log lines for paths under `prefix`, once `count` are in
        (the log is flushed at least every second)."""
        deadline = time.monotonic() + timeout
        while True:
            got = [
                r
                for r in (
                    json.loads(line) for line in list(self.frontend.lines) if line.startswith("{")
                )
                if r["direction"] == "outbound" and r["path"].startswith(prefix)
            ]
            if len(got) >= count or time.monotonic() > deadline:
                assert len(got) >= count, f"{len(got)} access-log lines under {prefix}, not {count}"
                return got
            time.sleep(0.1)


@dataclass
class Reply:
    status: int
    body: bytes
    seconds: float
    cut: bool = False  # the body broke off before its end

    @property
    def doc(self) -> dict:
        return json.loads(self.body)

    @property
    def name(self) -> str | None:
        """The backend that answered (None: the sidecar answered itself)."""
        try:
            return json.loads(self.body).get("name")
        except ValueError:
            return None


class Client:
    """An app calling `http://SERVICE/...` through the frontend's outbound proxy, on one
    kept-alive connection (opened again when the proxy closes it)."""

    def __init__(self, frontend: Proc, timeout: float = 10) -> None:
        host, port = hostport(frontend.urls["outbound"]).rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def call(
        self,
        service: str,
        path: str,
        method: str = "GET",
        headers: dict | None = None,
        body: bytes | None = None,
    ) -> Reply:
        start = time.monotonic()
        try:
            self.conn.request(method, f"http://{service}{path}", body=body, headers=headers or {})
            resp = self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            raise
        try:
            data, cut = resp.read(), False
        except http.client.IncompleteRead as e:  # the answer broke off
            data, cut = e.partial, True
        if resp.will_close or cut:
            self.conn.close()
        return Reply(resp.status, data, time.monotonic() - start, cut)

    def close(self) -> None:
        self.conn.close()


def tolerance(n: int, p: float, sds: float = 4.5) -> float:
    """`sds` standard deviations of the share of `n` draws that land with probability `p`."""
    return sds * math.sqrt(p * (1 - p) / n)
