"""Settings of `meshca serve`: a frozen dataclass from the command line, all problems reported.

Each field is documented in docs/ca.md ("Serving"). Checking collects all
problems and raises one ConfigError listing each, named by its flag.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from meshca import defaults
from meshca.spiffe import InvalidSpiffeId, SpiffeId

# The conventional port of `meshca serve --metrics-listen` (next to the sidecar's 15090).
CA_METRICS_PORT = 15091


class ConfigError(ValueError):
    """One or more settings are invalid; the message names each flag."""


@dataclass(frozen=True)
class Listen:
    """A host and port to bind (port 0: any free port)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> Listen:
    """Parse `HOST:PORT` or `[V6]:PORT`; ValueError with what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        num = int(port)
    except ValueError:
        raise ValueError(f"port {port!r} is not a number") from None
    if not 0 <= num <= 65535:
        raise ValueError(f"port {num} is out of range")
    return Listen(host, num)


@dataclass(frozen=True)
class ServeConfig:
    """Everything `meshca serve` needs to run."""

    home: Path
    listen: Listen = Listen("127.0.0.1", defaults.CA_PORT)
    cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    rate: float = 10.0
    burst: int = 20
    auth_fail_rate: float = 1.0  # per source address: failed authentications a second
    auth_fail_burst: int = 30
    max_body: int = 64 * 1024
    server_names: tuple[str, ...] = ()
    k8s_issuer: str | None = None
    k8s_audiences: tuple[str, ...] = ("meshca",)
    k8s_jwks: str | None = None  # a file path, or an https:// URL
    k8s_ca_file: Path | None = None
    k8s_token_file: Path | None = None
    k8s_jwks_refresh: float = 300.0
    k8s_jwks_min_interval: float = 10.0
    reload_interval: float = 2.0
    admin_ids: tuple[str, ...] = ()
    inject_image: str = defaults.IMAGE
    inject_ca_url: str = defaults.IN_CLUSTER_CA_URL
    inject_fail_open: bool = False
    max_connections: int = 4096  # open connections; past it new ones wait in the backlog
    drain_timeout: float = 20.0  # seconds in-flight requests get after SIGTERM
    metrics_listen: Listen | None = None  # plain-HTTP Prometheus /metrics; None: not served
    # A shared PostgreSQL store (several replicas) instead of the state directory `home`:
    # its DSN (it may hold a password: never in a repr), the KEK file, migrate at start.
    store_dsn: str | None = field(default=None, repr=False)
    kek_file: Path | None = None
    migrate: bool = False
    replica_name: str = ""  # how this replica shows in `meshca status` (default: host:port)

    @property
    def server_dns_names(self) -> tuple[str, ...]:
        """DNS SANs of the CA's own serving certificate."""
        base = ["localhost", "meshca", "meshca.mesh-system", "meshca.mesh-system.svc"]
        extra = [n for n in self.server_names if not _is_ip(n)]
        return tuple(dict.fromkeys(base + extra))

    @property
    def server_ips(self) -> tuple[str, ...]:
        """IP SANs of the CA's own serving certificate."""
        extra = [n for n in self.server_names if _is_ip(n)]
        return tuple(dict.fromkeys(["127.0.0.1", "::1", *extra]))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def build_serve_config(
    home: str,
    listen: str = defaults.CA_LISTEN,
    cert_ttl: float = 86400,
    rate: float = 10.0,
    burst: int = 20,
    auth_fail_rate: float = 1.0,
    auth_fail_burst: int = 30,
    max_body: int = 64 * 1024,
    server_names: tuple[str, ...] = (),
    k8s_issuer: str | None = None,
    k8s_audiences: tuple[str, ...] = ("meshca",),
    k8s_jwks: str | None = None,
    k8s_ca_file: str | None = None,
    k8s_token_file: str | None = None,
    k8s_jwks_refresh: float = 300.0,
    k8s_jwks_min_interval: float = 10.0,
    reload_interval: float = 2.0,
    admin_ids: tuple[str, ...] = (),
    inject_image: str = defaults.IMAGE,
    inject_ca_url: str = defaults.IN_CLUSTER_CA_URL,
    inject_fail_open: bool = False,
    max_connections: int = 4096,
    drain_timeout: float = 20.0,
    metrics_listen: str | None = None,
    store_dsn: str | None = None,
    kek_file: str | None = None,
    migrate: bool = False,
    replica_name: str = "",
) -> ServeConfig:
    """Validate every setting; ConfigError listing each problem by flag."""
    problems: list[str] = []
    if store_dsn is not None and not kek_file:
        problems.append("--kek-file: required with a PostgreSQL store (it seals the CA keys)")
    if kek_file and store_dsn is None:
        problems.append("--kek-file: goes with --store, --store-file or --store-env")
    if kek_file and not Path(kek_file).is_file():
        problems.append(f"--kek-file: no such file {kek_file!r}")
    if migrate and store_dsn is None:
        problems.append("--migrate: goes with --store, --store-file or --store-env")
    if len(replica_name) > 200 or any(not c.isprintable() for c in replica_name):
        problems.append("--replica-name: at most 200 printable characters")
    try:
        where = parse_listen(listen)
    except ValueError as e:
        problems.append(f"--listen: {e}")
        where = Listen("127.0.0.1", defaults.CA_PORT)
    if not 1 <= cert_ttl <= 365 * 86400:
        problems.append("--cert-ttl: must be between 1 and 31536000 seconds")
    if rate <= 0:
        problems.append("--rate: must be greater than 0")
    if burst < 1:
        problems.append("--burst: must be at least 1")
    if auth_fail_rate <= 0:
        problems.append("--auth-fail-rate: must be greater than 0")
    if auth_fail_burst < 1:
        problems.append("--auth-fail-burst: must be at least 1")
    if not 1024 <= max_body <= 16 * 1024 * 1024:
        problems.append("--max-body: must be between 1024 and 16777216 bytes")
    for name in server_names:
        if not name or any(c.isspace() for c in name):
            problems.append(f"--server-name: {name!r} is not a host name or IP address")
    if k8s_jwks and not k8s_issuer:
        problems.append("--k8s-issuer: required with --k8s-jwks (the token 'iss' to accept)")
    if k8s_issuer and not k8s_jwks and not k8s_issuer.startswith("https://"):
        problems.append(
            "--k8s-jwks: required unless --k8s-issuer is an https:// URL to discover keys from"
        )
    if k8s_jwks and not k8s_jwks.startswith("https://"):
        if k8s_jwks.startswith("http://"):
            problems.append("--k8s-jwks: must be a file or an https:// URL")
        elif not Path(k8s_jwks).is_file():
            problems.append(f"--k8s-jwks: no such file {k8s_jwks!r}")
    if not 1 <= k8s_jwks_refresh <= 86400:
        problems.append("--k8s-jwks-refresh: must be between 1 and 86400 seconds")
    if not 0 <= k8s_jwks_min_interval <= 3600:
        problems.append("--k8s-jwks-min-interval: must be between 0 and 3600 seconds")
    if not 0.1 <= reload_interval <= 10:
        problems.append("--reload-interval: must be between 0.1 and 10 seconds")
    for aid in admin_ids:
        try:
            SpiffeId.parse(aid)
        except InvalidSpiffeId as e:
            problems.append(f"--admin-id: {aid!r}: {e}")
    if not k8s_audiences or any(not a for a in k8s_audiences):
        problems.append("--k8s-audience: must not be empty")
    for flag, value in (("--k8s-ca-file", k8s_ca_file), ("--k8s-token-file", k8s_token_file)):
        if value and not Path(value).is_file():
            problems.append(f"{flag}: no such file {value!r}")
    if not 1 <= max_connections <= 1_000_000:
        problems.append("--max-connections: must be between 1 and 1000000")
    if not 0 <= drain_timeout <= 3600:
        problems.append("--drain-timeout: must be between 0 and 3600 seconds")
    metrics_where = None
    if metrics_listen is not None:
        try:
            metrics_where = parse_listen(metrics_listen)
        except ValueError as e:
            problems.append(f"--metrics-listen: {e}")
        else:
            if metrics_where == where and where.port != 0:
                problems.append(f"--metrics-listen: {metrics_where} is the API's --listen")
    if problems:
        raise ConfigError("; ".join(problems))
    return ServeConfig(
        home=Path(home),
        listen=where,
        cert_ttl=dt.timedelta(seconds=cert_ttl),
        rate=rate,
        burst=burst,
        auth_fail_rate=auth_fail_rate,
        auth_fail_burst=auth_fail_burst,
        max_body=max_body,
        server_names=tuple(server_names),
        k8s_issuer=k8s_issuer,
        k8s_audiences=tuple(k8s_audiences),
        k8s_jwks=k8s_jwks,
        k8s_ca_file=Path(k8s_ca_file) if k8s_ca_file else None,
        k8s_token_file=Path(k8s_token_file) if k8s_token_file else None,
        k8s_jwks_refresh=k8s_jwks_refresh,
        k8s_jwks_min_interval=k8s_jwks_min_interval,
        reload_interval=reload_interval,
        admin_ids=tuple(admin_ids),
        inject_image=inject_image,
        inject_ca_url=inject_ca_url,
        inject_fail_open=inject_fail_open,
        max_connections=max_connections,
        drain_timeout=drain_timeout,
        metrics_listen=metrics_where,
        store_dsn=store_dsn,
        kek_file=Path(kek_file) if kek_file else None,
        migrate=migrate,
        replica_name=replica_name,
    )


def store_dsn(
    store: str | None,
    store_file: str | None,
    store_env: str | None,
    environ: dict[str, str] | None = None,
) -> str:
    """The PostgreSQL DSN of the shared store from exactly one of `--store DSN`,
    `--store-file PATH` (a mounted Secret) or `--store-env NAME`. ConfigError naming the
    flag; the DSN itself (it may hold a password) is never in a message."""
    import os

    given = [(f, v) for f, v in (("--store", store), ("--store-file", store_file),
             ("--store-env", store_env)) if v]  # fmt: skip
    if len(given) != 1:
        raise ConfigError("--store, --store-file, --store-env: give exactly one")
    flag, value = given[0]
    if flag == "--store-file":
        try:
            dsn = Path(value).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--store-file: cannot read {value} ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--store-file: {value} is not text (a postgresql:// URL)") from None
    elif flag == "--store-env":
        dsn = (environ if environ is not None else dict(os.environ)).get(value, "").strip()
        if not dsn:
            raise ConfigError(f"--store-env: the environment variable {value} is not set")
    else:
        dsn = value.strip()
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{flag}: must be a postgresql:// URL")
    return dsn
