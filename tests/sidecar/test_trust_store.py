"""The sidecar's one owner of the trust bundle: publish, refuse a bad bundle and keep the last
good one, and every reader (handshake contexts, the CA client) sees a new bundle on its next
connection."""

import datetime as dt

import pytest

from meshca import pki
from meshca.client import EnrollmentClient
from meshca.spiffe import SpiffeId
from meshca.trust import BundleError
from sidecar.identity.creds import Credentials, CredentialStore
from sidecar.identity.trust import TrustBundle, TrustStore

NOW = dt.datetime.now(dt.UTC)
ID = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")


def ca():
    key = pki.new_key()
    root = pki.build_root(key, NOW)
    int_key = pki.new_key()
    return root, pki.build_intermediate(int_key, root, key, NOW), int_key


def creds_under(root, inter, int_key, bundle_pem):
    key = pki.new_key()
    leaf = pki.build_leaf(key.public_key(), ID, inter, int_key, NOW, dt.timedelta(hours=1))
    return Credentials.build(
        pki.key_pem(key), pki.pem_join([leaf, inter]), bundle_pem, "cluster.local", NOW
    )


@pytest.fixture
def world():
    old, new = ca(), ca()
    trust = TrustStore(TrustBundle.check(pki.pem_join([old[0]]), NOW, "bootstrap"), "cluster.local")
    return old, new, trust


def test_publish_reaches_every_reader(world):
    (old_root, oi, ok), (new_root, _, _), trust = world
    store = CredentialStore(trust, clock=lambda: NOW)
    store.publish(creds_under(old_root, oi, ok, trust.pem))
    client = EnrollmentClient("https://ca.example", lambda: trust.pem)
    seen = []
    trust.on_roots(seen.append)
    before_ctx, before_creds = trust.ca_context(), store.current
    assert trust.ca_context() is before_ctx  # one context per bundle, not per call

    both = pki.pem_join([old_root, new_root])
    assert trust.offer(both, NOW, sequence=2, revoked=frozenset())
    assert trust.current.source == "ca" and trust.current.sequence == 2
    assert client.bundle_pem == both  # the client to the CA, at its next request
    assert trust.ca_context() is not before_ctx  # JWKS fetches: a new context, new connections
    assert store.current is not before_creds  # handshakes: republished with the new roots
    assert store.current.bundle_pem == both and store.current.leaf == before_creds.leaf
    assert len(store.current.roots) == 2
    assert len(seen) == 1 and seen[0].pem == both


@pytest.mark.parametrize(
    "bad,error",
    [
        ("", "holds no PEM"),
        ("garbage", "holds no PEM"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not valid PEM"),
        ("intermediate", "not a self-signed root"),
        ("expired", "every root in it has expired"),
    ],
)
def test_a_bad_bundle_keeps_the_last_good_one(world, bad, error):
    (old_root, oi, ok), _, trust = world
    store = CredentialStore(trust, clock=lambda: NOW)
    store.publish(creds_under(old_root, oi, ok, trust.pem))
    held, held_creds = trust.current, store.current
    if bad == "intermediate":
        bad = pki.pem_join([oi])
    elif bad == "expired":
        k = pki.new_key()
        bad = pki.pem_join([pki.build_root(k, NOW - dt.timedelta(days=3), dt.timedelta(days=1))])
    with pytest.raises(BundleError, match=error):
        trust.offer(bad, NOW, sequence=5)
    assert trust.current is held and store.current is held_creds
    assert trust.last_refusal and error.split()[0] in trust.last_refusal


def test_an_older_sequence_never_undoes_a_rotation(world):
    (old_root, _, _), (new_root, _, _), trust = world
    both = pki.pem_join([old_root, new_root])
    trust.offer(both, NOW, sequence=3)
    with pytest.raises(BundleError, match="older than the 3 we hold"):
        trust.offer(pki.pem_join([old_root]), NOW, sequence=2)
    assert trust.pem == both
    trust.offer(pki.pem_join([new_root]), NOW, sequence=4)  # newer: taken
    assert trust.pem == pki.pem_join([new_root])


def test_revocations_alone_reach_their_listeners(world):
    _, _, trust = world
    roots_seen, revoked_seen = [], []
    trust.on_roots(roots_seen.append)
    trust.on_revoked(revoked_seen.append)
    pem = trust.pem
    assert trust.offer(pem, NOW, sequence=1, revoked=frozenset({"0a"}))
    assert revoked_seen == [frozenset({"0a"})] and roots_seen == []
    # an enrollment answer carries no revocations: they are kept
    trust.offer(pem, NOW, sequence=1, revoked=None)
    assert trust.current.revoked == frozenset({"0a"})
    assert not trust.offer(pem, NOW, sequence=1, revoked=frozenset({"0a"}))  # nothing new


def test_a_bundle_without_our_root_is_adopted_and_asks_for_renewal(world):
    """The CA retired the root of our certificate: peers under it are no longer trusted
    (we follow the CA), and the certificate manager is told to renew now."""
    (old_root, oi, ok), (new_root, _, _), trust = world
    store = CredentialStore(trust, clock=lambda: NOW)
    store.publish(creds_under(old_root, oi, ok, trust.pem))
    stale = []
    store.on_stale(lambda: stale.append(True))
    trust.offer(pki.pem_join([old_root, new_root]), NOW, sequence=2)
    assert stale == []  # still chains
    trust.offer(pki.pem_join([new_root]), NOW, sequence=3)
    assert stale == [True]
    assert store.current.bundle_pem == pki.pem_join([new_root])
    assert store.current.describe(NOW)["chain_valid"] is False


def test_repr_hides_pem(world):
    _, _, trust = world
    assert "BEGIN" not in repr(trust.current)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda pem: pem.replace(
            "-----BEGIN CERTIFICATE-----\n", "-----BEGIN CERTIFICATE-----\nComment: x\n\n"
        ),
        lambda pem: "".join("  " + line + "\n" for line in pem.splitlines()),
        lambda pem: (
            "junk -----BEGIN CERTIFICATE-----" + pem.split("-----BEGIN CERTIFICATE-----", 1)[1]
        ),
    ],
)
def test_what_is_trusted_is_what_was_checked(world, mangle):
    """Odd PEM that one parser reads and the other skips or refuses: the store publishes the
    canonical PEM of the roots it checked, or refuses the bundle; never a half-update."""
    (old_root, oi, ok), (new_root, _, _), trust = world
    store = CredentialStore(trust, clock=lambda: NOW)
    store.publish(creds_under(old_root, oi, ok, trust.pem))
    odd = mangle(pki.pem_join([old_root, new_root]))
    try:
        trust.offer(odd, NOW, sequence=2)
    except BundleError:
        assert trust.current.sequence is None and store.current.bundle_pem == trust.pem
        return
    assert trust.pem == pki.pem_join(trust.current.roots)  # canonical
    assert store.current.bundle_pem == trust.pem  # handshakes trust exactly that
    trust.ca_context()  # and the TLS library accepts it


def test_a_failing_listener_does_not_stop_the_others(world):
    _, (new_root, _, _), trust = world
    seen = []
    trust.on_roots(lambda b: 1 / 0)
    trust.on_roots(seen.append)
    trust.on_revoked(lambda r: 1 / 0)
    trust.on_revoked(seen.append)
    trust.offer(pki.pem_join([new_root]), NOW, sequence=2, revoked=frozenset({"0b"}))
    assert len(seen) == 2


def test_an_older_sequence_is_followed_only_when_allowed(world):
    (old_root, _, _), (new_root, _, _), trust = world
    trust.offer(pki.pem_join([old_root, new_root]), NOW, sequence=7)
    with pytest.raises(BundleError, match="older"):
        trust.offer(pki.pem_join([old_root]), NOW, sequence=2)
    assert "older" in trust.last_refusal
    assert trust.offer(pki.pem_join([old_root]), NOW, sequence=2, allow_older=True)
    assert trust.current.sequence == 2 and trust.last_refusal is None


def test_the_poll_follows_a_restored_ca_only_after_it_insists(world):
    """A CA restored from a backup serves an older sequence on every poll: after three polls
    in a row the sidecar follows it; a single stale answer never moves it."""
    from meshca.trust import BundleDoc
    from sidecar.identity.bundlewatch import ROLLBACK_POLLS, BundleWatcher

    (old_root, _, _), (new_root, _, _), trust = world
    trust.offer(pki.pem_join([old_root, new_root]), NOW, sequence=7)
    watcher = BundleWatcher("https://ca.example", trust)

    def doc(seq):
        return BundleDoc("cluster.local", (old_root,), pki.pem_join([old_root]), seq, frozenset())

    assert [watcher._insists(doc(2)) for _ in range(ROLLBACK_POLLS)] == [False] * (
        ROLLBACK_POLLS - 1
    ) + [True]
    assert not watcher._insists(doc(3))  # a different older sequence starts the count again
    assert not watcher._insists(doc(8))  # a newer one never needs insisting


def test_new_roots_or_a_new_certificate_start_a_new_session_context(world):
    """The inbound serves each connection with the generation's own context: TLS sessions
    (tickets, session cache) made under the old roots or the old certificate cannot be
    resumed under the new ones. Revocations alone keep the context (they are checked for
    every connection, resumed or not)."""
    (old_root, oi, ok), (new_root, ni, nk), trust = world
    store = CredentialStore(trust, clock=lambda: NOW)
    not_ready = store.server_context()
    store.publish(creds_under(old_root, oi, ok, trust.pem))
    first = store.server_context()
    assert first is not not_ready and first is store.current.server_context
    assert store.server_context() is first  # one context per generation, not per connection
    assert trust.offer(trust.pem, NOW, sequence=2, revoked=frozenset({"01"}))
    assert store.server_context() is first
    assert trust.offer(pki.pem_join([old_root, new_root]), NOW, sequence=3, revoked=frozenset())
    second = store.server_context()
    assert second is not first
    store.publish(creds_under(old_root, oi, ok, trust.pem))
    assert store.server_context() is not second


def test_the_watcher_calls_back_after_each_document_not_after_a_304(world, caplog):
    """The sidecar gives back what a bundle document's checks touched (`HeapKeeper.settle`)
    after each poll that brought one, taken in or refused; an unchanged answer (304) did
    no such work. A failing callback is logged and the poll's answer stands."""
    import asyncio

    from meshca.trust import BundleDoc
    from sidecar.identity.bundlewatch import BundleWatcher

    (old_root, _, _), (new_root, _, _), trust = world
    watcher = BundleWatcher("https://ca.example", trust)
    both = (old_root, new_root)
    answers = [
        (BundleDoc("cluster.local", both, pki.pem_join(both), 3, frozenset()), "a"),
        (None, "a"),  # 304
        (BundleDoc("cluster.local", (), "not pem", 4, frozenset()), "b"),  # refused
    ]

    async def fetch(now, use_etag):
        doc, etag = answers.pop(0)
        return doc, etag, False

    watcher._fetch = fetch  # type: ignore[method-assign]
    calls = []
    watcher.after_each(lambda: calls.append(1))
    watcher.after_each(lambda: 1 / 0)

    async def polls():
        changed = await watcher.poll()
        assert calls == [1]
        assert await watcher.poll() is False
        assert calls == [1]
        with pytest.raises(BundleError):
            await watcher.poll()
        return changed

    assert asyncio.run(polls()) is True
    assert calls == [1, 1]
    assert trust.current.sequence == 3
    assert "after a bundle poll" in caplog.text


def test_status_and_probes_read_values_kept_at_build_time(world):
    """What `/status` shows of the roots, and a certificate's validity and serial (read by
    the readiness probe, the metrics and the renewal timer), are read once when the bundle
    or the credentials are built, and equal what the certificates say."""
    from meshca.svid import serial_hex
    from meshca.trust import fingerprints

    (old_root, old_inter, old_key), (new_root, _, _), trust = world
    trust.offer(pki.pem_join([old_root, new_root]), NOW, sequence=2)
    roots = trust.current.describe()["roots"]
    assert roots == [
        {"subject": c.subject.rfc4514_string(), "sha256": fp}
        for c, fp in zip((old_root, new_root), fingerprints((old_root, new_root)), strict=True)
    ]
    creds = creds_under(old_root, old_inter, old_key, pki.pem_join([old_root]))
    assert creds.not_before == creds.leaf.not_valid_before_utc
    assert creds.not_after == creds.leaf.not_valid_after_utc
    assert creds.serial == serial_hex(creds.leaf)
    rebuilt = creds.with_bundle(pki.pem_join([old_root, new_root]), NOW)
    assert (rebuilt.not_after, rebuilt.serial) == (creds.not_after, creds.serial)
