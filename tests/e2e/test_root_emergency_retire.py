"""An emergency retirement (`meshca rotate --force-retire`) right after activation, before any
sidecar renewed: each sidecar adopts the new bundle at its next poll, sees that its own
certificate no longer chains to it, and enrolls again at once with its token (renewal over
mTLS is impossible: the CA no longer trusts that certificate). One whose token is spent
says so, and `sidecar identity` shows that its certificate does not chain."""

from __future__ import annotations

from helpers import mint_token, tail
from rotation_rig import IDS, Rig, wait_for

from meshca import pki


def test_force_retire_makes_stranded_sidecars_enroll_again(tmp_path):
    rig = Rig(tmp_path)
    try:
        rig.call_both_ways()
        assert rig.rotate("--start-root-rotation")["action"] == "prepare_root"
        act = rig.rotate("--propagation-wait", "0")
        assert act["action"] == "activate_root"
        rig.wait_ca_serving_under(pki.pem_join([rig.authority().roots[-1]]))
        before = {name: rig.identity(name)["serial"] for name in IDS}

        # alpha's kubelet has a fresh token for it (as a projected SA token would be); beta's
        # join token was spent at its first enrollment.
        (tmp_path / "alpha" / "token").write_text(mint_token(rig.home, IDS["alpha"]) + "\n")
        ret = rig.rotate("--force-retire")
        assert ret["action"] == "retire_root"
        assert "unexpired leaf certificate(s) lose trust" in ret["reason"]

        new_issuer = rig.authority().intermediate.subject.rfc4514_string()
        wait_for(
            "alpha to enroll again under the new root on its own",
            lambda: rig.identity("alpha")["issuer"] == new_issuer,
            20,
            [rig.sidecars["alpha"], rig.ca],
        )
        alpha = rig.identity("alpha")
        assert alpha["chain_valid"] and alpha["serial"] != before["alpha"]

        wait_for(
            "beta to report its failing enrollment",
            lambda: "join token has already been used" in rig.sidecars["beta"].stderr,
            20,
            [rig.sidecars["beta"]],
        )
        beta = rig.identity("beta")
        assert beta["serial"] == before["beta"] and not beta["chain_valid"], beta
        assert rig.status("beta")["bundle"]["sequence"] == ret["bundle_sequence"]

        # Given a new token, beta recovers without a restart.
        (tmp_path / "beta" / "token").write_text(mint_token(rig.home, IDS["beta"]) + "\n")
        wait_for(
            "beta to enroll again with its new token",
            lambda: rig.identity("beta")["issuer"] == new_issuer,
            30,
            [rig.sidecars["beta"]],
        )
        rig.call_both_ways(fresh_jwt=True)
        assert rig.failed == [], rig.failed + [tail(rig.sidecars["beta"].stderr)]
    finally:
        rig.stop()
