"""The CA's Prometheus metrics: what a scrape shows, parsed back as Prometheus would read it.

The collector alone (pure: counters and the state of an `Authority`), then the CA server
without sockets (aiohttp's mocked requests through the real error middleware and handlers):
concurrent enrollments with every kind of credential and refusal, counted exactly.
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import json
from pathlib import Path
from unittest import mock

import jwt
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from meshca import metrics, pki, store
from meshca import rotation_plan as rotation
from meshca.authority import Authority, init_ca
from meshca.config import build_serve_config
from meshca.rotate import rotate
from meshca.server import CAServer, errors_and_access_log
from meshca.spiffe import SpiffeId

MESHCA = Path(__file__).resolve().parents[2] / "meshca"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def value(page: dict, name: str, **labels: str) -> float:
    return page[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "ca"
    init_ca(home)
    return home


# -- the collector alone -------------------------------------------------------


def test_counters_histogram_and_state_parse_back_exactly(home):
    authority = Authority.load(home)
    m = metrics.CaMetrics(lambda: authority)
    for credential, n in ((metrics.JOIN_TOKEN, 3), (metrics.K8S_TOKEN, 2)):
        for _ in range(n):
            m.issued(credential)
    for reason in ("invalid_token", "invalid_token", "bad_csr", "rate_limited"):
        m.refused(reason)
    m.rate_limited()
    m.jwt_svid()
    for seconds in (0.001, 0.0011, 0.3, 11.0):  # 1 ms is in le="0.001": bounds are inclusive
        m.enrollment(metrics.ISSUED, seconds)
    m.ledger = metrics.LedgerCounts(certificates=7, revoked_serials=2)

    page = samples(generate_latest(m.registry).decode())

    assert value(page, "meshca_ca_issuances_total", credential="join_token") == 3
    assert value(page, "meshca_ca_issuances_total", credential="k8s_token") == 2
    assert value(page, "meshca_ca_issuances_total", credential="mtls_renewal") == 0
    assert value(page, "meshca_ca_refusals_total", reason="invalid_token") == 2
    assert value(page, "meshca_ca_refusals_total", reason="bad_csr") == 1
    assert value(page, "meshca_ca_refusals_total", reason="rate_limited") == 1
    assert value(page, "meshca_ca_refusals_total", reason="revoked") == 0  # known: reported at 0
    assert value(page, "meshca_ca_rate_limited_total") == 1
    assert value(page, "meshca_ca_jwt_svids_total") == 1

    hist = "meshca_ca_enrollment_duration_seconds"
    buckets = {
        dict(labels)["le"]: v
        for (name, labels), v in page.items()
        if name == hist + "_bucket" and dict(labels)["outcome"] == "issued"
    }
    assert buckets["0.001"] == 1 and buckets["0.0025"] == 2 and buckets["0.25"] == 2
    assert buckets["0.5"] == 3 and buckets["10.0"] == 3 and buckets["+Inf"] == 4
    assert list(buckets) == [repr(b) for b in map(float, metrics.DURATION_BUCKETS)] + ["+Inf"]
    assert value(page, hist + "_count", outcome="issued") == 4
    assert value(page, hist + "_sum", outcome="issued") == pytest.approx(11.3021)
    assert value(page, hist + "_count", outcome="refused") == 0

    inter = authority.intermediate.not_valid_after_utc.timestamp()
    assert value(page, "meshca_ca_intermediate_not_after_seconds") == inter
    [root] = authority.roots
    cn = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert value(page, "meshca_ca_root_not_after_seconds", root=cn) == (
        root.not_valid_after_utc.timestamp()
    )
    assert value(page, "meshca_ca_root_rotation_stage", stage="none") == 1
    assert value(page, "meshca_ca_root_rotation_stage", stage="prepared") == 0
    assert value(page, "meshca_ca_root_rotation_stage", stage="activated") == 0
    assert value(page, "meshca_ca_bundle_sequence") == authority.state.sequence
    assert value(page, "meshca_ca_ledger_certificates") == 7
    assert value(page, "meshca_ca_revoked_serials") == 2


def test_ledger_gauges_are_left_out_until_read(home):
    authority = Authority.load(home)
    m = metrics.CaMetrics(lambda: authority)
    names = {f.name for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    assert "meshca_ca_ledger_certificates" not in names
    assert "meshca_ca_revoked_serials" not in names
    assert "meshca_ca_bundle_sequence" in names


def test_openmetrics_page_parses(home):
    authority = Authority.load(home)
    m = metrics.CaMetrics(lambda: authority)
    m.issued(metrics.MTLS_RENEWAL)
    m.ledger = metrics.LedgerCounts(1, 0)
    text = generate_openmetrics(m.registry).decode()
    assert text.endswith("# EOF\n")
    assert "# UNIT meshca_ca_enrollment_duration_seconds seconds" in text
    families = {f.name: f for f in parse_openmetrics(text)}
    assert families["meshca_ca_issuances"].type == "counter"
    [renewals] = [
        s
        for s in families["meshca_ca_issuances"].samples
        if s.labels["credential"] == "mtls_renewal"
    ]
    assert renewals.value == 1


def test_own_registry_only_meshca_ca_families(home):
    authority = Authority.load(home)
    m = metrics.CaMetrics(lambda: authority)
    names = {f.name for f in m.registry.collect()}
    assert names and all(n.startswith("meshca_ca_") for n in names)
    assert not any(f.name.startswith("meshca_ca_") for f in REGISTRY.collect())


def test_unknown_refusal_code_is_counted_as_other(home):
    authority = Authority.load(home)
    m = metrics.CaMetrics(lambda: authority)
    m.refused("some_new_code")
    m.refused("another")
    page = samples(generate_latest(m.registry).decode())
    assert value(page, "meshca_ca_refusals_total", reason="other") == 2
    reasons = {dict(labels)["reason"] for (n, labels) in page if n == "meshca_ca_refusals_total"}
    assert reasons == {*metrics.REFUSAL_REASONS, "other"}


def _api_error_codes() -> set[str]:
    """Every JSON error code written in meshca/: `code="..."` arguments, `code = "..."` class
    attributes and `{"error": "..."}` literals."""
    found = set()
    for path in MESHCA.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "code":
                if isinstance(node.value, ast.Constant):
                    found.add(node.value.value)
            elif isinstance(node, ast.ClassDef):
                for st in node.body:
                    if (
                        isinstance(st, ast.Assign)
                        and [getattr(t, "id", None) for t in st.targets] == ["code"]
                        and isinstance(st.value, ast.Constant)
                    ):
                        found.add(st.value.value)
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "error":
                        if isinstance(v, ast.Constant):
                            found.add(v.value)
    return found


def test_every_error_code_of_the_api_is_a_known_reason():
    from meshca.server import _HTTP_CODES

    codes = _api_error_codes() | set(_HTTP_CODES.values()) | {"http_error"}
    assert {"invalid_token", "bad_csr", "rate_limited", "internal"} <= codes  # the scan works
    assert codes <= set(metrics.REFUSAL_REASONS), "add the new code to metrics.REFUSAL_REASONS"


def _root(cn: str | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@pytest.mark.parametrize(
    ("cns", "by_serial"),
    [
        (["meshca root aa"], [False]),
        (["meshca root aa", "meshca root bb"], [False, False]),
        (["meshca root aa", "meshca root aa"], [True, True]),  # a shared CN: told apart
        ([None, "meshca root bb"], [True, False]),  # no CN
    ],
)
def test_root_labels_are_distinct(cns, by_serial):
    roots = tuple(_root(cn) for cn in cns)
    labels = metrics.root_labels(roots)
    assert len(set(labels)) == len(labels)
    for label, cert, cn, serial in zip(labels, roots, cns, by_serial, strict=True):
        assert label == (pki.serial_hex(cert) if serial else cn)


def test_root_rotation_shows_both_roots_and_the_stage(home):
    rotate(home, rotation.Settings(), start_root_rotation=True)
    authority = Authority.load(home)
    m = metrics.CaMetrics(lambda: authority)
    page = samples(generate_latest(m.registry).decode())
    roots = [labels for (n, labels) in page if n == "meshca_ca_root_not_after_seconds"]
    assert len(roots) == 2
    assert value(page, "meshca_ca_root_rotation_stage", stage="prepared") == 1
    assert value(page, "meshca_ca_root_rotation_stage", stage="none") == 0
    assert value(page, "meshca_ca_bundle_sequence") == 2


# -- the server, without sockets -------------------------------------------------

PEER = ("10.1.2.3", 40000)


class _PeerSSL:
    """What the server reads from a TLS connection: the client's certificate (DER)."""

    def __init__(self, cert: x509.Certificate) -> None:
        self._der = cert.public_bytes(serialization.Encoding.DER)

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self._der


def _request(
    app: web.Application,
    method: str,
    path: str,
    body: bytes = b"",
    token: str | None = None,
    cert: x509.Certificate | None = None,
    accept: str | None = None,
) -> web.Request:
    extra = {"peername": PEER, "ssl_object": _PeerSSL(cert) if cert else None}
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: extra.get(key, default)
    payload = StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    payload.feed_eof()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if accept:
        headers["Accept"] = accept
    return make_mocked_request(
        method, path, headers=headers, app=app, transport=transport, payload=payload
    )


def _csr_body() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return json.dumps({"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode()


def _sa_token(key: rsa.RSAPrivateKey, namespace: str, account: str) -> str:
    now = int(store.utcnow().timestamp())
    claims = {
        "iss": "https://k8s.example",
        "aud": ["meshca"],
        "sub": f"system:serviceaccount:{namespace}:{account}",
        "iat": now,
        "exp": now + 600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": account}},
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture
def k8s_key(tmp_path: Path) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return key, path


async def _scrape(ca: CAServer, accept: str | None = None) -> web.Response:
    resp = await ca.get_metrics(_request(ca.metrics_app(), "GET", "/metrics", accept=accept))
    assert resp.status == 200
    return resp


async def test_concurrent_enrollments_are_counted_exactly(home, k8s_key):
    key, jwks = k8s_key
    config = build_serve_config(
        str(home), rate=0.001, burst=2, k8s_issuer="https://k8s.example", k8s_jwks=str(jwks)
    )
    ca = CAServer(config)
    app = ca.app()
    try:

        def mint(name: str) -> str:
            sid = SpiffeId.parse(f"spiffe://cluster.local/ns/default/sa/{name}")
            minted = ca.enroller.join_tokens.mint(sid, store.utcnow())
            ca.ledger.add_join_token(minted.jti, str(sid), minted.expires_at)
            return minted.token

        async def enroll(token: str | None, cert: x509.Certificate | None = None, body=None):
            req = _request(app, "POST", "/v1/certificates", body or _csr_body(), token, cert)
            return await errors_and_access_log(req, ca.post_certificates)

        joins, replayed = [mint(f"web-{i}") for i in range(12)], mint("replayed")
        sas = [_sa_token(key, "shop", f"orders-{i}") for i in range(3)]
        answers = await asyncio.gather(
            *(enroll(t) for t in joins),
            *(enroll(t) for t in sas),
            enroll(replayed),
            enroll(replayed),  # the same join token twice at once: one wins
            *(enroll("not-a-jwt") for _ in range(4)),
            enroll(mint("garbage-csr"), body=b'{"csr": "hello"}'),
            enroll(None),  # no credential at all
        )
        statuses = [a.status for a in answers]
        assert statuses[:15] == [200] * 15
        assert sorted(statuses[15:17]) == [200, 401]
        assert statuses[17:] == [401] * 4 + [400, 401]

        # Renewals over mTLS with two of the new certificates; a third renewal of the same
        # identity passes its burst of 2 (enrollment + renewal) and is rate limited.
        chains = [json.loads(a.body)["certificate_chain"] for a in answers[:2]]
        certs = [x509.load_pem_x509_certificates(c.encode())[0] for c in chains]
        renewals = await asyncio.gather(*(enroll(None, c) for c in certs))
        assert [r.status for r in renewals] == [200, 200]
        limited = await enroll(None, certs[0])
        assert limited.status == 429

        for c in certs:  # JWT-SVIDs over mTLS
            req = _request(app, "POST", "/v1/jwt", b'{"audience": "orders"}', cert=c)
            assert (await errors_and_access_log(req, ca.post_jwt)).status == 200

        async def not_found(_request: web.Request) -> web.StreamResponse:
            raise web.HTTPNotFound()

        lost = await errors_and_access_log(_request(app, "GET", "/nope"), not_found)
        assert lost.status == 404

        ca.ledger.revoke_serial(pki.serial_hex(certs[1]))

        resp = await _scrape(ca)
        assert resp.content_type == "text/plain"
        page = samples(resp.body.decode())
    finally:
        await ca.close()

    assert value(page, "meshca_ca_issuances_total", credential="join_token") == 13
    assert value(page, "meshca_ca_issuances_total", credential="k8s_token") == 3
    assert value(page, "meshca_ca_issuances_total", credential="mtls_renewal") == 2
    refusals = {
        dict(labels)["reason"]: v
        for (n, labels), v in page.items()
        if n == "meshca_ca_refusals_total" and v
    }
    assert refusals == {
        "invalid_token": 5,  # 4 garbage tokens, the replay's loser
        "bad_csr": 1,
        "missing_credential": 1,
        "rate_limited": 1,
        "not_found": 1,
    }
    assert value(page, "meshca_ca_rate_limited_total") == 1
    assert value(page, "meshca_ca_jwt_svids_total") == 2
    hist = "meshca_ca_enrollment_duration_seconds"
    assert value(page, hist + "_count", outcome="issued") == 18
    assert value(page, hist + "_count", outcome="refused") == 8
    assert value(page, hist + "_bucket", outcome="refused", le="+Inf") == 8
    assert 0 < value(page, hist + "_sum", outcome="issued") < 18 * 10
    # The ledger: 18 workload certificates and the CA's own serving certificate.
    assert value(page, "meshca_ca_ledger_certificates") == 19
    assert value(page, "meshca_ca_revoked_serials") == 1


async def test_scrape_negotiates_openmetrics(home):
    ca = CAServer(build_serve_config(str(home)))
    try:
        om = await _scrape(ca, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
        text = await _scrape(ca, "text/plain")
        anything = await _scrape(ca)
    finally:
        await ca.close()
    assert om.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.body.endswith(b"# EOF\n")
    for resp in (text, anything):
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b"# EOF" not in resp.body
        assert b"meshca_ca_ledger_certificates 1.0\n" in resp.body


async def test_a_ledger_that_cannot_be_read_leaves_its_gauges_out(home):
    ca = CAServer(build_serve_config(str(home)))
    try:
        first = samples((await _scrape(ca)).body.decode())
        assert value(first, "meshca_ca_ledger_certificates") == 1

        def broken() -> metrics.LedgerCounts:
            raise OSError("disk I/O error")

        ca._ledger_counted_at = float("-inf")  # the last count is older than the TTL
        with mock.patch.object(ca, "_ledger_counts", broken):
            page = samples((await _scrape(ca)).body.decode())
    finally:
        await ca.close()
    assert not any(n == "meshca_ca_ledger_certificates" for n, _ in page)
    assert value(page, "meshca_ca_bundle_sequence") == 1  # the rest of the scrape stands


async def test_scrapes_within_the_ttl_count_the_ledger_once(home):
    """Anyone can ask /metrics: the ledger's tables are scanned at most once per TTL."""
    ca = CAServer(build_serve_config(str(home)))
    calls = []
    real = ca._ledger_counts

    def counting() -> metrics.LedgerCounts:
        calls.append(1)
        return real()

    try:
        with mock.patch.object(ca, "_ledger_counts", counting):
            pages = [samples((await _scrape(ca)).body.decode()) for _ in range(20)]
    finally:
        await ca.close()
    assert len(calls) == 1
    assert all(value(p, "meshca_ca_ledger_certificates") == 1 for p in pages)


@pytest.mark.parametrize(
    ("flag", "problem"),
    [
        ("nonsense", "--metrics-listen: 'nonsense' is not HOST:PORT"),
        ("0.0.0.0:99999", "--metrics-listen: port 99999 is out of range"),
        ("127.0.0.1:8443", "--metrics-listen: 127.0.0.1:8443 is the API's --listen"),
    ],
)
def test_metrics_listen_is_checked(home, flag, problem):
    from meshca.config import ConfigError

    with pytest.raises(ConfigError) as err:
        build_serve_config(str(home), metrics_listen=flag)
    assert str(err.value) == problem


def test_metrics_are_off_unless_asked(home):
    from meshca.config import CA_METRICS_PORT, Listen

    assert build_serve_config(str(home)).metrics_listen is None
    on = build_serve_config(str(home), metrics_listen=f"0.0.0.0:{CA_METRICS_PORT}")
    assert on.metrics_listen == Listen("0.0.0.0", 15091)
