"""Root rotation with realistic timing: hour-long leaves, and a rotation that happens while
nothing renews. After the activate step every sidecar still reaches the CA (renewal,
re-enrollment, JWT-SVIDs, JWKS) because the bundle poll published the new root to the one
trust store that every client reads, and calls keep flowing; the same after the retire
step, and again through a second full rotation.

The sibling with compressed time (4 s leaves, renewals during the rotation) is
test_soak_rotation.py.
"""

from __future__ import annotations

from rotation_rig import IDS, Rig

from meshca import pki


def check_everything(rig: Rig, issuer_serial: str) -> None:
    """Renew, re-enroll and fetch JWT-SVIDs on every sidecar, calling through both sidecars
    between each; every certificate in use ends up issued by `issuer_serial`."""
    for name in IDS:
        before = rig.identity(name)["serial"]
        after = rig.renew(name)["serial"]
        assert after != before
        rig.call_both_ways(fresh_jwt=True)
    for name in IDS:
        rig.reenroll(name)
        rig.call_both_ways(fresh_jwt=True)
    intermediate = rig.authority().intermediate
    assert pki.serial_hex(intermediate) == issuer_serial
    for name in IDS:
        ident = rig.identity(name)
        assert ident["chain_valid"] and not ident["expired"], ident
        assert ident["issuer"] == intermediate.subject.rfc4514_string()


def one_rotation(rig: Rig) -> None:
    start = rig.authority()
    serials = {name: rig.identity(name)["serial"] for name in IDS}

    # prepare: the new root is published beside the old one; issuing stays under the old.
    prep = rig.rotate("--start-root-rotation")
    assert prep["action"] == "prepare_root"
    rig.wait_bundle(prep["bundle_sequence"])
    for name in IDS:
        assert len(rig.status(name)["bundle"]["roots"]) == 2
    rig.call_both_ways()

    # activate: issuing moves under the new root; the CA's own certificate too.
    act = rig.rotate("--propagation-wait", "0")
    assert act["action"] == "activate_root"
    new_root = pki.pem_join([rig.authority().roots[-1]])
    rig.wait_ca_serving_under(new_root)
    # Realistic timing: nothing renewed on its own since the rotation began.
    assert {name: rig.identity(name)["serial"] for name in IDS} == serials
    rig.call_both_ways()

    # The bug of issue 9 was here: renewals and JWT-SVIDs failed against the new CA chain.
    check_everything(rig, act["intermediate"])

    # retire: the gate holds while leaves from the old root are unexpired (the ones from
    # before the renewals, an hour long); an operator who knows they are all replaced
    # forces it, as we do here.
    dry = rig.rotate("--retire-wait", "0", "--dry-run")
    assert dry["action"] == "none" and dry["stage"] == "activated", dry
    ret = rig.rotate("--force-retire")
    assert ret["action"] == "retire_root" and ret["retired_root"] == start.state.issuing_root
    rig.wait_bundle(ret["bundle_sequence"])
    for name in IDS:
        roots = rig.status(name)["bundle"]["roots"]
        assert [r["sha256"] for r in roots] == [pki.fingerprint(rig.authority().roots[0])]
    rig.call_both_ways()
    check_everything(rig, act["intermediate"])


def test_root_rotation_with_hour_long_leaves(tmp_path):
    rig = Rig(tmp_path)
    try:
        rig.call_both_ways()
        one_rotation(rig)
        one_rotation(rig)  # and again: the bootstrap files now hold a root two rotations old
        rig.no_errors_logged()
        assert rig.failed == [], rig.failed
        assert rig.calls > 100
    finally:
        rig.stop()
