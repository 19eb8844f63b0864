"""Trust bundles: which roots a bundle may hold, the bundle document, and endorsements that
lead a client from a root it trusts to the CA's new one (and refuse every forgery)."""

import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from meshca import pki
from meshca.trust import BundleDoc, BundleError, endorsed_roots, load_roots

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def root(now=NOW, lifetime=pki.ROOT_LIFETIME):
    key = pki.new_key()
    return pki.build_root(key, now, lifetime), key


@pytest.fixture(scope="module")
def rotation():
    """root1 -> root2 -> root3, each endorsed by the one before."""
    r1, k1 = root()
    r2, k2 = root()
    r3, k3 = root()
    e12 = pki.build_endorsement(r2, r1, k1, NOW)
    e23 = pki.build_endorsement(r3, r2, k2, NOW)
    return {"r1": r1, "r2": r2, "r3": r3, "k1": k1, "k2": k2, "e12": e12, "e23": e23}


def test_endorsement_profile(rotation):
    e, r1, r2 = rotation["e12"], rotation["r1"], rotation["r2"]
    assert e.subject == r2.subject and e.issuer == r1.subject
    assert e.public_key() == r2.public_key()
    e.verify_directly_issued_by(r1)
    assert e.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert e.not_valid_after_utc <= r1.not_valid_after_utc


def test_direct_and_transitive_endorsements(rotation):
    r1, r2, r3 = rotation["r1"], rotation["r2"], rotation["r3"]
    ends = [rotation["e12"], rotation["e23"]]
    assert endorsed_roots([r1], [r1, r2], ends, NOW) == (r1, r2)  # the prepare stage
    assert endorsed_roots([r1], [r2], ends, NOW) == (r2,)  # after retirement
    assert endorsed_roots([r1], [r3], ends, NOW) == (r3,)  # two rotations later
    with pytest.raises(BundleError, match="no root we trust endorses"):
        endorsed_roots([r2], [r2, r3], [], NOW)
    assert endorsed_roots([r3], [r3], [], NOW) == (r3,)  # nothing new: nothing needed


def forged(new_root, signer_key, issuer_name, **changes):
    b = (
        x509.CertificateBuilder()
        .subject_name(changes.get("subject", new_root.subject))
        .issuer_name(issuer_name)
        .public_key(changes.get("public_key", new_root.public_key()))
        .serial_number(x509.random_serial_number())
        .not_valid_before(changes.get("not_before", NOW - HOUR))
        .not_valid_after(changes.get("not_after", NOW + 1000 * HOUR))
        .add_extension(
            x509.BasicConstraints(ca=changes.get("ca", True), path_length=None), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return b.sign(signer_key, hashes.SHA256())


@pytest.mark.parametrize(
    "case",
    [
        "signed_by_attacker_with_trusted_name",  # the issuer name is ours, the key is not
        "other_key",  # endorses a different key under the new root's name
        "other_name",  # the right key under another name
        "expired",
        "not_yet_valid",
        "not_a_ca",
    ],
)
def test_forged_or_unusable_endorsements_are_refused(rotation, case):
    r1, k1, r2 = rotation["r1"], rotation["k1"], rotation["r2"]
    attacker_root, attacker_key = root()
    if case == "signed_by_attacker_with_trusted_name":
        e = forged(r2, attacker_key, r1.subject)
    elif case == "other_key":
        e = forged(r2, k1, r1.subject, public_key=attacker_root.public_key())
    elif case == "other_name":
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the new root")])
        e = forged(r2, k1, r1.subject, subject=name)
    elif case == "expired":
        e = forged(r2, k1, r1.subject, not_before=NOW - 10 * HOUR, not_after=NOW - HOUR)
    elif case == "not_yet_valid":
        e = forged(r2, k1, r1.subject, not_before=NOW + HOUR, not_after=NOW + 10 * HOUR)
    else:
        e = forged(r2, k1, r1.subject, ca=False)
    with pytest.raises(BundleError, match="no root we trust endorses"):
        endorsed_roots([r1], [r1, r2], [e], NOW)


def test_an_endorsement_cannot_smuggle_a_second_root(rotation):
    """One good endorsement does not carry an attacker's root offered beside it."""
    r1, r2 = rotation["r1"], rotation["r2"]
    evil, _ = root()
    with pytest.raises(BundleError, match="no root we trust endorses"):
        endorsed_roots([r1], [r2, evil], [rotation["e12"]], NOW)


@pytest.mark.parametrize(
    "make,error",
    [
        (lambda r: "", "holds no PEM certificate"),
        (lambda r: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not valid"),
        (lambda r: pki.pem_join([r["leaf"]]), "is not a CA certificate"),
        (lambda r: pki.pem_join([r["inter"]]), "is not a self-signed root"),
        (lambda r: pki.pem_join([r["expired"]]), "every root in it has expired"),
    ],
)
def test_load_roots_refuses(make, error):
    r, k = root()
    ik = pki.new_key()
    inter = pki.build_intermediate(ik, r, k, NOW)
    from meshca.spiffe import SpiffeId

    leaf_key = pki.new_key()
    leaf = pki.build_leaf(
        leaf_key.public_key(),
        SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"),
        inter,
        ik,
        NOW,
        HOUR,
    )
    expired, _ = root(NOW - 3 * HOUR, HOUR)
    certs = {"leaf": leaf, "inter": inter, "expired": expired}
    with pytest.raises(BundleError, match=error):
        load_roots(make(certs), NOW)


def test_load_roots_keeps_an_expired_root_beside_a_valid_one():
    old, _ = root(NOW - 3 * HOUR, HOUR)
    new, _ = root()
    assert load_roots(pki.pem_join([old, new]), NOW) == (old, new)


def doc(**over):
    r, _ = root()
    d = {
        "trust_domain": "cluster.local",
        "roots": pki.pem_join([r]),
        "sequence": 3,
        "revoked": ["0ABC"],
        "endorsements": "",
    }
    d.update(over)
    return json.dumps(d).encode()


def test_bundle_doc_parses():
    parsed = BundleDoc.parse(doc(), NOW, "cluster.local")
    assert parsed.sequence == 3 and parsed.revoked == frozenset({"0abc"})
    assert len(parsed.roots) == 1 and parsed.endorsements == ()
    assert "BEGIN" not in repr(parsed)


@pytest.mark.parametrize(
    "raw,error",
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (doc(trust_domain=None), "lacks 'trust_domain'"),
        (doc(trust_domain="evil.example"), "not 'cluster.local'"),
        (doc(roots=None), "lacks 'roots'"),
        (doc(roots="nothing"), "holds no PEM"),
        (doc(sequence="3"), "'sequence'"),
        (doc(sequence=True), "'sequence'"),
        (doc(sequence=-1), "'sequence'"),
        (doc(revoked="0abc"), "'revoked'"),
        (doc(revoked=[1]), "'revoked'"),
        (doc(endorsements=5), "'endorsements'"),
        (doc(endorsements="-----BEGIN CERTIFICATE-----\nxx\n"), "'endorsements'"),
        (b"{" + b" " * (1 << 20) + b"}", "over"),
    ],
)
def test_bundle_doc_refuses(raw, error):
    with pytest.raises(BundleError, match=error):
        BundleDoc.parse(raw, NOW, "cluster.local")


def test_an_issuing_intermediate_cannot_endorse_a_root(rotation):
    """pathlen:0 (an intermediate's) leaves no room for a CA below it: a stolen issuing key
    cannot vouch for a root of its own."""
    r1, k1 = rotation["r1"], rotation["k1"]
    ik = pki.new_key()
    inter = pki.build_intermediate(ik, r1, k1, NOW)
    evil, _ = root()
    e = forged(evil, ik, inter.subject)
    with pytest.raises(BundleError, match="no root we trust endorses"):
        endorsed_roots([r1], [evil], [inter, e], NOW)


def test_too_many_roots_or_endorsements_are_refused_before_any_signature_check(rotation):
    many = [root()[0] for _ in range(17)]
    with pytest.raises(BundleError, match="more than 16"):
        load_roots(pki.pem_join(many), NOW)
    d = json.loads(doc())
    d["endorsements"] = pki.pem_join([rotation["e12"]] * 17)
    with pytest.raises(BundleError, match="more than 16"):
        BundleDoc.parse(json.dumps(d).encode(), NOW)
