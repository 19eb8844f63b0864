"""The `meshca` command line: init, serve, token, bundle, status, certs.

Errors print one line naming what is wrong to stderr and exit 1 (2 for usage);
nothing a command refuses leaves anything changed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshca import defaults, pki, store
from meshca.authority import Authority, init_ca
from meshca.config import CA_METRICS_PORT, ConfigError, build_serve_config
from meshca.errors import MeshcaError, StateError
from meshca.spiffe import DEFAULT_TRUST_DOMAIN, InvalidSpiffeId, SpiffeId
from meshca.tokens import JoinTokens


class CLIError(Exception):
    """A user-facing command failure (exit 1)."""


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).expanduser()


def _dsn(args: argparse.Namespace) -> str | None:
    """The PostgreSQL store's DSN when one of --store/--store-file/--store-env is given."""
    from meshca.config import ConfigError, store_dsn

    given = (getattr(args, k, None) for k in ("store", "store_file", "store_env"))
    if not any(given):
        if getattr(args, "kek_file", None):
            raise CLIError("--kek-file: goes with --store, --store-file or --store-env")
        return None
    try:
        return store_dsn(args.store, args.store_file, args.store_env)
    except ConfigError as e:
        raise CLIError(str(e)) from None


def _state(args: argparse.Namespace, migrate: bool = False) -> store.StateStore:
    """Where the command works: --home, or a PostgreSQL store with its --kek-file."""
    dsn = _dsn(args)
    if dsn is None and not args.home:
        raise CLIError("give --home DIR, or --store/--store-file/--store-env with --kek-file")
    kek = Path(args.kek_file).expanduser() if getattr(args, "kek_file", None) else None
    home = _home(args) if args.home else None
    return store.open_store(home, dsn, kek, migrate=migrate)


def cmd_init(args: argparse.Namespace) -> int:
    """meshca init: create a root, an intermediate and a ledger in --home (or a store)."""
    where = _state(args, migrate=True)
    try:
        init_ca(where, args.trust_domain)
        authority = Authority.load(where)
    finally:
        where.close()
    root, inter = authority.roots[0], authority.intermediate
    print(f"created CA for trust domain {authority.trust_domain} in {where.describe()}")
    print(
        f"  root:         serial {pki.serial_hex(root)}  not after "
        f"{pki.rfc3339(root.not_valid_after_utc)}  sha256 {pki.fingerprint(root)}"
    )
    print(
        f"  intermediate: serial {pki.serial_hex(inter)}  not after "
        f"{pki.rfc3339(inter.not_valid_after_utc)}  sha256 {pki.fingerprint(inter)}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """meshca serve: run the HTTPS API until SIGTERM."""
    from meshca.server import serve

    dsn = _dsn(args)
    if dsn is None and not args.home:
        raise CLIError("give --home DIR, or --store/--store-file/--store-env with --kek-file")
    try:
        config = build_serve_config(
            home=str(_home(args)) if args.home else "",
            listen=args.listen,
            cert_ttl=args.cert_ttl,
            rate=args.rate,
            burst=args.burst,
            auth_fail_rate=args.auth_fail_rate,
            auth_fail_burst=args.auth_fail_burst,
            max_body=args.max_body,
            server_names=tuple(args.server_name or ()),
            k8s_issuer=args.k8s_issuer,
            k8s_audiences=tuple(args.k8s_audience or ("meshca",)),
            k8s_jwks=args.k8s_jwks,
            k8s_ca_file=args.k8s_ca_file,
            k8s_token_file=args.k8s_token_file,
            k8s_jwks_refresh=args.k8s_jwks_refresh,
            k8s_jwks_min_interval=args.k8s_jwks_min_interval,
            reload_interval=args.reload_interval,
            admin_ids=tuple(args.admin_id or ()),
            inject_image=args.inject_image,
            inject_ca_url=args.inject_ca_url,
            inject_fail_open=args.inject_fail_open,
            max_connections=args.max_connections,
            drain_timeout=args.drain_timeout,
            metrics_listen=args.metrics_listen,
            store_dsn=dsn,
            kek_file=args.kek_file,
            migrate=args.migrate,
            replica_name=args.replica_name or "",
        )
    except ConfigError as e:
        raise CLIError(str(e)) from None
    where = store.open_store(
        config.home if args.home else None, dsn, config.kek_file, migrate=config.migrate
    )
    try:
        if args.init_if_missing and not where.exists():
            try:
                init_ca(where, args.trust_domain)  # first start on an empty volume or store
                print(f"meshca: created a new CA in {where.describe()}", flush=True)
            except StateError:
                if not where.exists():  # (else another replica made it first: use that)
                    raise
        Authority.load(where)  # fail before binding when the state is bad
    finally:
        where.close()

    def ready(url: str) -> None:
        print(f"meshca: serving on {url}", flush=True)

    def metrics_ready(url: str) -> None:
        print(f"meshca: metrics listening on {url}", flush=True)

    try:
        import uvloop  # optional, faster event loop (pip install meshca[fast])
    except ImportError:
        asyncio.run(serve(config, ready, metrics_ready))
    else:
        uvloop.run(serve(config, ready, metrics_ready))
    return 0


def _workload_id(text: str, flag: str, authority: Authority) -> SpiffeId:
    """A workload SPIFFE ID of this CA's trust domain, or CLIError naming `flag`."""
    try:
        sid = SpiffeId.parse(text)
    except InvalidSpiffeId as e:
        raise CLIError(f"{flag}: {e}") from None
    if sid.trust_domain != authority.trust_domain or not sid.is_workload:
        raise CLIError(
            f"{flag}: {sid} is not a workload ID in trust domain {authority.trust_domain}"
        )
    return sid


def cmd_token(args: argparse.Namespace) -> int:
    """meshca token: print a one-time join token for --spiffe-id."""
    where = _state(args)
    try:
        authority = Authority.load(where)
        sid = _workload_id(args.spiffe_id, "--spiffe-id", authority)
        tokens = JoinTokens(where.key(store.TOKEN_KEY_FILE), authority.trust_domain)
        ttl, dns = dt.timedelta(seconds=args.ttl), tuple(args.dns or ())
        ledger = where.ledger()
        try:
            minted = tokens.mint_recorded(ledger, sid, store.utcnow(), ttl, dns)
        finally:
            ledger.close()
    finally:
        where.close()
    print(minted.token)
    return 0


def cmd_jwt(args: argparse.Namespace) -> int:
    """meshca jwt: print a JWT-SVID for --sub and --aud (for testing by hand)."""
    from meshca.authority import ensure_jwt_key
    from meshca.jwtsvid import JwtIssuer

    where = _state(args)
    try:
        authority = Authority.load(where)
        sid = _workload_id(args.sub, "--sub", authority)
        issuer = JwtIssuer(ensure_jwt_key(where), authority.trust_domain)
    finally:
        where.close()
    minted = issuer.mint(sid, args.aud, store.utcnow(), dt.timedelta(seconds=args.ttl))
    print(minted.token)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """meshca revoke: revoke a certificate (--serial) or all of an identity's (--spiffe-id)."""
    from meshca.revocation import revoke

    if args.ban_for is not None and not args.spiffe_id:
        raise CLIError("--ban-for: goes with --spiffe-id")
    if args.ban_for is not None and args.ban_for <= 0:
        raise CLIError("--ban-for: must be a positive number of seconds")
    if not args.ca_url:
        period = dt.timedelta(seconds=args.ban_for) if args.ban_for is not None else None
        where = _state(args)
        try:
            doc = revoke(where, args.serial, args.spiffe_id, period)
        finally:
            where.close()
    else:
        body: dict[str, Any] = (
            {"serial": args.serial} if args.serial else {"spiffe_id": args.spiffe_id}
        )
        if args.ban_for is not None:
            body["ban_for"] = args.ban_for
        doc = _remote(args, "/v1/admin/revoke", body)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        if not doc["revoked"]:
            print("nothing to revoke: no unexpired, unrevoked certificate matched")
        for r in doc["revoked"]:
            print(f"revoked {r['serial']}  {r['spiffe_id']}  (valid until {r['not_after'][:19]}Z)")
        if doc.get("blocked"):
            until = doc["blocked"]["until"] or "meshca unrevoke"
            print(f"new certificates for {doc['blocked']['spiffe_id']} refused until {until}")
    return 0


def cmd_unrevoke(args: argparse.Namespace) -> int:
    """meshca unrevoke --spiffe-id ID: let a revoked identity enroll again."""
    from meshca.revocation import unrevoke

    if not args.ca_url:
        where = _state(args)
        try:
            doc = unrevoke(where, args.spiffe_id)
        finally:
            where.close()
    else:
        doc = _remote(args, "/v1/admin/unrevoke", {"spiffe_id": args.spiffe_id})
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{doc['spiffe_id']} may enroll again (certificates revoked before stay revoked)")
    return 0


def _rotation_settings(args: argparse.Namespace) -> Any:
    from meshca import rotation_plan as rotation

    for flag in ("intermediate_share", "root_share"):
        v = getattr(args, flag)
        if not 0 < v < 1:
            raise CLIError(f"--{flag.replace('_', '-')}: must be between 0 and 1")
    for flag in ("propagation_wait", "retire_wait"):
        if getattr(args, flag) < 0:
            raise CLIError(f"--{flag.replace('_', '-')}: must not be negative")
    return rotation.Settings(
        intermediate_share=args.intermediate_share,
        root_share=args.root_share,
        propagation_wait=dt.timedelta(seconds=args.propagation_wait),
        retire_wait=dt.timedelta(seconds=args.retire_wait),
    )


def print_rotation(doc: dict[str, Any], as_json: bool) -> None:
    """What `meshca rotate` prints."""
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    if doc["action"] == "none":
        print(f"rotate: nothing to do ({doc['reason']})")
    else:
        verb = "would" if doc.get("dry_run") else "did"
        print(f"rotate: {verb} {doc['action'].replace('_', ' ')}: {doc['reason']}")
    for key in (
        "new_root",
        "new_root_sha256",
        "intermediate",
        "under_root",
        "old_intermediate",
        "retired_root",
        "endorsed_by",
        "bundle_sequence",
    ):
        if key in doc:
            print(f"  {key}: {doc[key]}")
    print(f"  root rotation stage: {doc['stage']}")
    if doc["action"] in ("prepare_root", "retire_root") and not doc.get("dry_run"):
        # What trusts the CA outside the mesh does not follow endorsements (docs/ca.md).
        print(
            "  the bundle changed: publish `meshca bundle` to the bootstrap ConfigMap and the "
            "webhook's caBundle before the next stage"
        )
    if doc.get("next_due"):
        print(f"  next step due: {doc['next_due']}")


def cmd_rotate(args: argparse.Namespace) -> int:
    """meshca rotate: one rotation step, on a state directory or through a running CA."""
    settings = _rotation_settings(args)
    if not args.ca_url:
        from meshca.rotate import rotate

        where = _state(args)
        try:
            doc = rotate(
                where,
                settings,
                args.force_intermediate,
                args.start_root_rotation,
                args.dry_run,
                wait_for_lock=not args.no_wait,
                force_retire=args.force_retire,
            )
        finally:
            where.close()
    else:
        doc = _remote(
            args,
            "/v1/admin/rotate",
            {
                "dry_run": args.dry_run,
                "force_intermediate": args.force_intermediate,
                "start_root_rotation": args.start_root_rotation,
                "force_retire": args.force_retire,
                "propagation_wait": args.propagation_wait,
                "retire_wait": args.retire_wait,
                "intermediate_share": args.intermediate_share,
                "root_share": args.root_share,
            },
        )
    print_rotation(doc, args.json)
    return 0


def _remote(args: argparse.Namespace, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST to a running CA's admin API, authenticated by mTLS or a ServiceAccount token."""
    import ssl
    import urllib.error
    import urllib.request

    if not args.ca_url.startswith("https://"):
        raise CLIError("--ca-url: must be an https:// URL")
    if not args.ca_bundle:
        raise CLIError("--ca-bundle: required with --ca-url (the CA's trust bundle)")
    try:
        trusted_pem = Path(args.ca_bundle).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--ca-bundle: cannot read {args.ca_bundle} ({e})") from None
    headers = {"Content-Type": "application/json"}
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise CLIError("--cert and --key go together")
    elif args.token_file:
        try:
            headers["Authorization"] = "Bearer " + Path(args.token_file).read_text().strip()
        except OSError as e:
            raise CLIError(f"--token-file: cannot read ({e.strerror})") from None
    else:
        raise CLIError("with --ca-url, authenticate with --cert/--key or --token-file")

    def context(bundle_pem: str) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cadata=bundle_pem)
            if args.cert:
                ctx.load_cert_chain(args.cert, args.key)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise CLIError(f"--ca-bundle/--cert/--key: unusable ({e})") from None
        return ctx

    req = urllib.request.Request(  # noqa: S310 (https only, checked above)
        args.ca_url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers=headers,
        method="POST",
    )
    for attempt in (1, 2):
        try:
            with urllib.request.urlopen(req, timeout=120, context=context(trusted_pem)) as resp:  # noqa: S310
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("detail", "")
            except ValueError:
                detail = ""
            raise CLIError(f"the CA answered {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if attempt == 1 and isinstance(reason, ssl.SSLCertVerificationError):
                # The CA issues under a root newer than our bundle (a ConfigMap not yet
                # updated after a root rotation): follow its endorsements, then retry.
                trusted_pem = _endorsed_bundle(args.ca_url, trusted_pem)
                continue
            raise CLIError(f"cannot reach the CA at {args.ca_url}: {e}") from None
    raise AssertionError("unreachable")


def _endorsed_bundle(ca_url: str, trusted_pem: str) -> str:
    """The CA's current roots, if endorsements lead to them from `trusted_pem`."""
    import asyncio

    from meshca.client import CAError, fetch_bundle
    from meshca.trust import BundleError

    try:
        doc, _, _ = asyncio.run(fetch_bundle(ca_url, trusted_pem, dt.datetime.now(dt.UTC)))
    except (CAError, BundleError) as e:
        raise CLIError(f"cannot reach the CA at {ca_url}: {e}") from None
    assert doc is not None
    print(
        "meshca: the CA's certificate is from a root newer than --ca-bundle; accepted it "
        "through the CA's endorsements (update the bundle: meshca bundle)",
        file=sys.stderr,
    )
    return doc.roots_pem


def cmd_inject(args: argparse.Namespace) -> int:
    """meshca inject -f FILE: print the manifests with the sidecar injected."""
    from meshca.inject import InjectError, InjectOptions, inject_yaml

    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as e:
        raise CLIError(f"-f: cannot read {args.file} ({e.strerror})") from None
    opts = InjectOptions(
        image=args.image,
        ca_url=args.ca_url,
        trust_domain=args.trust_domain,
        bundle_configmap=args.bundle_configmap,
    )
    try:
        sys.stdout.write(inject_yaml(text, opts))
    except InjectError as e:
        raise CLIError(str(e)) from None
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """meshca bundle: print the trust bundle (root certificates, PEM)."""
    where = _state(args)
    try:
        sys.stdout.write(Authority.load(where).bundle_pem())
    finally:
        where.close()
    return 0


RECENT_REPLICAS = dt.timedelta(minutes=5)  # `meshca status` lists replicas seen since


def status_doc(where: Path | store.StateStore, settings: Any = None) -> dict[str, Any]:
    """What `meshca status --json` prints (`settings`: the waits the rotate job uses)."""
    from meshca import rotation_plan as rotation
    from meshca.rotate import facts_for

    sd = store.open_state(where)
    authority = Authority.load(sd)
    ledger = sd.ledger()
    try:
        counts = ledger.counts()
        p = rotation.plan(
            facts_for(authority, ledger, store.utcnow()), settings or rotation.Settings()
        )
    finally:
        ledger.close()
    rot = authority.state.root_rotation
    backend: dict[str, Any] = {"kind": sd.kind, "where": sd.describe()}
    ping, replicas = getattr(sd, "ping", None), getattr(sd, "replicas", None)
    if ping is not None and replicas is not None:
        backend["schema_version"] = ping()
        backend["revision"] = sd.revision()
        since = store.iso(store.utcnow() - RECENT_REPLICAS)
        backend["replicas"] = replicas(since)
    return {
        **({"home": sd.describe()} if sd.kind == store.StateDir.kind else {}),
        "store": backend,
        "trust_domain": authority.trust_domain,
        "bundle_sequence": authority.state.sequence,
        "root_rotation": {
            **rot,
            "next_action": p.action if p.action != "none" else None,
            "next_due": pki.rfc3339(p.next_due) if p.next_due else None,
            "note": p.reason,
        },
        "roots": [pki.describe(r) for r in authority.roots],
        "intermediate": pki.describe(authority.intermediate),
        "ledger": counts,
    }


def cmd_status(args: argparse.Namespace) -> int:
    """meshca status: trust domain, CA certificates, ledger counts."""
    where = _state(args)
    try:
        doc = status_doc(where, _rotation_settings(args))
    finally:
        where.close()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"trust domain:  {doc['trust_domain']}")
    backend = doc["store"]
    if "home" in doc:
        print(f"home:          {doc['home']}")
    else:
        print(
            f"store:         {backend['where']} (schema version {backend['schema_version']}, "
            f"state revision {backend['revision']})"
        )
        print(f"replicas seen in the last {int(RECENT_REPLICAS.total_seconds() // 60)} min:")
        for r in backend["replicas"]:
            print(
                f"  {r['name']:30} {r['url'] or '-':28} seen {r['seen_at'][:19]}Z  "
                f"revision {r['revision']}  meshca {r['version']}"
            )
        if not backend["replicas"]:
            print("  (none)")
    for label, cert in [("root", r) for r in doc["roots"]] + [
        ("intermediate", doc["intermediate"])
    ]:
        print(f"{label}:")
        for key in ("subject", "serial", "not_after", "sha256"):
            print(f"  {key + ':':11} {cert[key]}")
    rot = doc["root_rotation"]
    print(
        f"root rotation: {rot['stage']} ({rot['note']}; next step due {rot['next_due'] or 'now'})"
    )
    c = doc["ledger"]
    print(
        f"ledger:        {c['issued']} issued ({c['active']} still valid), {c['refused']} refused, "
        f"{c['join_tokens_used']}/{c['join_tokens_minted']} join tokens used"
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """meshca migrate: create or upgrade the shared store's schema (PostgreSQL)."""
    from meshca.config import ConfigError, store_dsn

    try:
        dsn = store_dsn(args.store, args.store_file, args.store_env)
    except ConfigError as e:
        print(f"meshca migrate: {e}", file=sys.stderr)
        return 2
    from meshca.errors import MeshcaError
    from meshca.pgstore import migrate

    try:
        version = migrate(dsn)
    except MeshcaError as e:  # (the messages never carry the DSN)
        print(f"meshca migrate: {e}", file=sys.stderr)
        return 1
    print(f"meshca migrate: the store's schema is at version {version}")
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    """meshca rekey: re-seal the store's CA keys with a new key-encryption key."""
    from meshca.kek import load_kek

    if _dsn(args) is None:
        raise CLIError("rekey works on a PostgreSQL store: give --store-file/--store-env/--store")
    from meshca.pgstate import PgState

    new = load_kek(Path(args.new_kek_file).expanduser())
    where = _state(args)
    try:
        assert isinstance(where, PgState)
        if new.kek_id == where.kek_id:
            raise CLIError("--new-kek-file: it is the KEK the keys are sealed with now")
        keys = where.rekey(new)
    finally:
        where.close()
    print(
        f"meshca rekey: {keys} keys in {where.describe()} re-sealed with the key-encryption key "
        f"{new.kek_id}; restart every replica with it"
    )
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """meshca certs: list issued certificates from the ledger."""
    where = _state(args)
    try:
        where.read_state()
        ledger = where.ledger()
        try:
            rows = ledger.certificates(args.spiffe_id, args.active, args.limit)
        finally:
            ledger.close()
    finally:
        where.close()
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return 0
    print(f"{'SERIAL':40}  {'NOT AFTER':20}  {'CREDENTIAL':10}  SPIFFE ID")
    for r in rows:
        print(f"{r.serial:40}  {r.not_after[:19] + 'Z':20}  {r.credential:10}  {r.spiffe_id}")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _add_store_args(s: argparse.ArgumentParser, where: Any, kek: bool = True) -> None:
    """--store / --store-file / --store-env (in the group `where`) and, with `kek`,
    --kek-file."""
    where.add_argument(
        "--store",
        metavar="DSN",
        help="a shared PostgreSQL store, postgresql://... (a password here shows in `ps`: "
        "prefer --store-file or --store-env)",
    )
    where.add_argument(
        "--store-file", help="a file holding the store's DSN (a mounted Kubernetes Secret)"
    )
    where.add_argument("--store-env", help="an environment variable holding the store's DSN")
    if not kek:
        return
    s.add_argument(
        "--kek-file",
        help="with a store: the key-encryption key that seals the CA keys (32 random bytes, "
        "base64; a mounted Secret)",
    )


def _add_target_args(s: argparse.ArgumentParser) -> None:
    """--home or a store, or --ca-url with how to trust it and how to authenticate as an admin."""
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--home", help="work on this state directory")
    _add_store_args(s, where)
    where.add_argument("--ca-url", help="ask a running CA (as an admin identity)")
    s.add_argument("--ca-bundle", help="with --ca-url: the CA's trust bundle (PEM)")
    s.add_argument("--cert", help="with --ca-url: an admin client certificate chain (PEM)")
    s.add_argument("--key", help="with --ca-url: its key")
    s.add_argument("--token-file", help="with --ca-url: a projected ServiceAccount token")


def _add_rotation_args(s: argparse.ArgumentParser) -> None:
    """The waits and shares `meshca rotate` uses (and `meshca status` needs to say what is due)."""
    s.add_argument(
        "--propagation-wait",
        type=float,
        default=defaults.PROPAGATION_WAIT.total_seconds(),
        help="seconds between prepare and activate (default %(default)g)",
    )
    s.add_argument(
        "--retire-wait",
        type=float,
        default=defaults.RETIRE_WAIT.total_seconds(),
        help="seconds between activate and retire (default %(default)g: 24 h leaves + 1 h)",
    )
    s.add_argument(
        "--intermediate-share",
        type=float,
        default=2 / 3,
        help="replace the intermediate past this share of its life (default 2/3)",
    )
    s.add_argument(
        "--root-share",
        type=float,
        default=2 / 3,
        help="start a root rotation past this share of its life (default 2/3)",
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser (also documents every flag in --help)."""
    p = argparse.ArgumentParser(prog="meshca", description="A small SPIFFE certificate authority.")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_text, description=help_text)
        where = s.add_mutually_exclusive_group()
        where.add_argument("--home", help="the CA's state directory")
        _add_store_args(s, where)
        return s

    s = cmd("init", "create a new CA (root + issuing intermediate) in --home")
    s.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        help=f"SPIFFE trust domain (default {DEFAULT_TRUST_DOMAIN})",
    )
    s.set_defaults(func=cmd_init)

    s = cmd("serve", "serve the enrollment API over HTTPS")
    s.add_argument(
        "--listen",
        default=defaults.CA_LISTEN,
        help="HOST:PORT (default %(default)s; port 0 picks a free one)",
    )
    s.add_argument(
        "--cert-ttl",
        type=_positive_float,
        default=86400.0,
        help="workload certificate lifetime in seconds (default 86400)",
    )
    s.add_argument(
        "--rate",
        type=_positive_float,
        default=10.0,
        help="enrollments per second allowed per identity (default 10)",
    )
    s.add_argument("--burst", type=int, default=20, help="burst per identity (default 20)")
    s.add_argument(
        "--auth-fail-rate",
        type=_positive_float,
        default=1.0,
        help="failed authentications per second allowed per source address; past it, "
        "every request from that address is answered 429 (default 1)",
    )
    s.add_argument(
        "--auth-fail-burst",
        type=int,
        default=30,
        help="failed authentications a source address may make at once (default 30)",
    )
    s.add_argument(
        "--max-body",
        type=int,
        default=64 * 1024,
        help="largest request body in bytes (default 65536)",
    )
    s.add_argument(
        "--server-name",
        action="append",
        metavar="NAME",
        help="extra DNS name or IP for the CA's serving certificate (repeatable)",
    )
    s.add_argument("--k8s-issuer", help="accept Kubernetes SA tokens with this 'iss'")
    s.add_argument(
        "--k8s-audience",
        action="append",
        metavar="AUD",
        help="accepted SA token audience (repeatable; default 'meshca')",
    )
    s.add_argument(
        "--k8s-jwks",
        metavar="FILE|URL",
        help="the cluster's JWKS: a file or an https:// URL (default: OIDC discovery from an "
        "https:// --k8s-issuer)",
    )
    s.add_argument("--k8s-ca-file", help="CA bundle to verify an https:// --k8s-jwks")
    s.add_argument("--k8s-token-file", help="bearer token file for fetching --k8s-jwks")
    s.add_argument(
        "--k8s-jwks-refresh",
        type=float,
        default=300.0,
        help="seconds between JWKS refreshes from a URL (default 300)",
    )
    s.add_argument(
        "--k8s-jwks-min-interval",
        type=float,
        default=10.0,
        help="least seconds between two JWKS fetches, also on unknown kid (default 10)",
    )
    s.add_argument(
        "--reload-interval",
        type=float,
        default=2.0,
        help="seconds between checks of state.json for rotations (default 2)",
    )
    s.add_argument(
        "--admin-id",
        action="append",
        metavar="SPIFFE_ID",
        help="an identity allowed to call /v1/admin/* (repeatable)",
    )
    s.add_argument(
        "--inject-image",
        default=defaults.IMAGE,
        help="the sidecar image the /v1/inject webhook adds",
    )
    s.add_argument(
        "--inject-ca-url",
        default=defaults.IN_CLUSTER_CA_URL,
        help="the CA's URL as injected pods see it",
    )
    s.add_argument(
        "--inject-fail-open",
        action="store_true",
        help="admit a pod unchanged (with a warning) when it cannot be injected; "
        "default: refuse it with the reason",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=4096,
        help="open connections at most; past it new ones wait in the listen backlog "
        "until one closes (default 4096)",
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=20.0,
        help="on SIGTERM: seconds in-flight requests get to finish before the CA exits "
        "(default 20)",
    )
    s.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics "
        f"(default: off; the conventional port is {CA_METRICS_PORT}, e.g. "
        f"0.0.0.0:{CA_METRICS_PORT}; port 0 picks a free one)",
    )
    s.add_argument(
        "--init-if-missing",
        action="store_true",
        help="create the CA first if --home (or the store) holds none (idempotent first "
        "start; replicas starting at once make one CA)",
    )
    s.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        help="with --init-if-missing: the trust domain of a new CA",
    )
    s.add_argument(
        "--migrate",
        action="store_true",
        help="with a store: create or upgrade its schema at start (as `meshca migrate`)",
    )
    s.add_argument(
        "--replica-name",
        help="with a store: this replica's name in `meshca status` (default HOST:PORT)",
    )
    s.set_defaults(func=cmd_serve)

    s = cmd("token", "print a one-time join token for a SPIFFE ID")
    s.add_argument("--spiffe-id", required=True, help="the identity the token enrolls")
    s.add_argument("--ttl", type=int, default=600, help="token lifetime in seconds (default 600)")
    s.add_argument(
        "--dns",
        action="append",
        metavar="NAME",
        help="a DNS SAN the certificate will carry (repeatable)",
    )
    s.set_defaults(func=cmd_token)

    s = cmd("jwt", "print a JWT-SVID (for testing by hand)")
    s.add_argument("--sub", required=True, help="the SPIFFE ID the token is for")
    s.add_argument("--aud", required=True, help="the audience")
    s.add_argument(
        "--ttl", type=int, default=300, help="lifetime in seconds (default 300, max 3600)"
    )
    s.set_defaults(func=cmd_jwt)

    s = sub.add_parser(
        "rotate",
        help="rotate the intermediate and the root, one stage per run (run it from cron)",
        description="Take at most one rotation step that is due: replace the intermediate "
        "past its share of lifetime, or advance a root rotation (prepare, activate, retire).",
    )
    _add_target_args(s)
    s.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument(
        "--force-intermediate",
        action="store_true",
        help="replace the intermediate now (under the root that issues)",
    )
    s.add_argument(
        "--start-root-rotation",
        action="store_true",
        help="begin a root rotation now (the prepare stage)",
    )
    s.add_argument(
        "--force-retire",
        action="store_true",
        help="emergency: retire the old root now (activated stage), before its wait and "
        "while leaves under it are unexpired; their holders must enroll again",
    )
    _add_rotation_args(s)
    s.add_argument(
        "--no-wait", action="store_true", help="exit at once if another rotate holds the lock"
    )
    s.set_defaults(func=cmd_rotate)

    s = sub.add_parser(
        "revoke", help="revoke a certificate, or every current certificate of an identity"
    )
    _add_target_args(s)
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="the certificate's serial (hex, as meshca certs shows)")
    which.add_argument(
        "--spiffe-id",
        help="revoke all unexpired certificates of this ID and refuse new ones until "
        "`meshca unrevoke` (or --ban-for)",
    )
    s.add_argument(
        "--ban-for",
        type=float,
        metavar="SECONDS",
        help="with --spiffe-id: refuse new certificates for this long only",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_revoke)

    s = sub.add_parser(
        "unrevoke", help="let an identity revoked with --spiffe-id get certificates again"
    )
    _add_target_args(s)
    s.add_argument("--spiffe-id", required=True, help="the identity to let back in")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_unrevoke)

    s = sub.add_parser(
        "inject",
        help="add the sidecar to Kubernetes manifests (stdin/stdout)",
        description="Print the manifests with the meshca sidecar injected into "
        "every Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and "
        "CronJob; other objects are printed unchanged.",
    )
    s.add_argument("-f", "--file", required=True, help="a YAML file, or - for stdin")
    s.add_argument("--image", default=defaults.IMAGE, help="the sidecar image")
    s.add_argument(
        "--ca-url",
        default=defaults.IN_CLUSTER_CA_URL,
        help="the CA's URL as seen from pods",
    )
    s.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="the trust domain")
    s.add_argument(
        "--bundle-configmap",
        default="meshca-bundle",
        help="the ConfigMap (in the pod's namespace) with ca-root.pem",
    )
    s.set_defaults(func=cmd_inject)

    s = cmd("bundle", "print the trust bundle (root certificates, PEM)")
    s.set_defaults(func=cmd_bundle)

    s = cmd("status", "show the CA's certificates, rotation stage and ledger counts")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _add_rotation_args(s)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser(
        "migrate",
        help="create or upgrade the schema of a PostgreSQL store",
        description="Create or upgrade the schema of the shared PostgreSQL store (safe to run "
        "from several replicas at once; a no-op when it is current).",
    )
    _add_store_args(s, s, kek=False)
    s.set_defaults(func=cmd_migrate)

    s = cmd("rekey", "re-seal a PostgreSQL store's CA keys with a new key-encryption key")
    s.add_argument(
        "--new-kek-file", required=True, help="the new key-encryption key (32 bytes, base64)"
    )
    s.set_defaults(func=cmd_rekey)

    s = cmd("certs", "list issued certificates from the ledger")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--spiffe-id", help="only this identity")
    s.add_argument("--active", action="store_true", help="only certificates not yet expired")
    s.add_argument("--limit", type=int, help="at most this many (newest first)")
    s.set_defaults(func=cmd_certs)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `meshca` console script."""
    args = parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (CLIError, MeshcaError) as e:
        detail = e.detail if isinstance(e, MeshcaError) else str(e)
        print(f"meshca {args.command}: error: {detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
