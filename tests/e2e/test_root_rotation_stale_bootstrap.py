"""A sidecar stopped during a root rotation and started after it, from a bootstrap bundle that
still holds only the old root (the ConfigMap nobody updated), reaches the CA: after the
activate step, and after the retire step too. It follows the endorsement (the new root
cross-signed by the old one) that the CA publishes beside its bundle. The rotation CronJob
with the same stale bundle reaches the CA the same way. Hour-long leaves: nothing renews
by accident.
"""

from __future__ import annotations

import datetime as dt
import json
import time

from helpers import run_meshca, tail
from mesh import admin_get, start_sidecar
from rotation_rig import IDS, Rig

from meshca import pki


def test_sidecar_started_from_a_stale_bootstrap_bundle(tmp_path):
    rig = Rig(tmp_path)
    try:
        old_root_pem = pki.pem_join(rig.authority().roots)
        assert rig.bootstrap_pem("beta") == old_root_pem
        rig.call_both_ways()
        rotator_cert, rotator_key = rig.rotator_credentials()  # the CronJob's, from before

        prep = rig.rotate("--start-root-rotation")
        assert prep["action"] == "prepare_root"
        rig.stop_pod("beta")  # down for the whole propagation window
        rig.wait_bundle(prep["bundle_sequence"])

        act = rig.rotate("--propagation-wait", "0")
        assert act["action"] == "activate_root"
        rig.wait_ca_serving_under(pki.pem_join([rig.authority().roots[-1]]))

        # Back from the same old bootstrap file: enrolls through the endorsement.
        rig.reenroll("beta")
        assert rig.bootstrap_pem("beta") == old_root_pem
        bundle = rig.status("beta")["bundle"]
        assert bundle["source"] == "ca" and bundle["sequence"] == prep["bundle_sequence"]
        assert bundle["endorsed_discoveries"] >= 1 and len(bundle["roots"]) == 2
        beta = rig.identity("beta")
        assert beta["issuer"] == rig.authority().intermediate.subject.rfc4514_string()
        rig.call_both_ways(fresh_jwt=True)
        for name in IDS:
            rig.renew(name)
        rig.call_both_ways(fresh_jwt=True)

        # The CronJob's retire step, through the CA's admin API, trusting the stale bundle.
        stale = tmp_path / "stale-configmap.pem"
        stale.write_text(old_root_pem)
        out = run_meshca(
            "rotate",
            *("--ca-url", rig.ca.url, "--ca-bundle", str(stale)),
            *("--cert", str(rotator_cert), "--key", str(rotator_key)),
            *("--force-retire", "--json"),
        )
        ret = json.loads(out.stdout)
        assert ret["action"] == "retire_root", ret
        assert "accepted it through the CA's endorsements" in out.stderr
        rig.wait_bundle(ret["bundle_sequence"])
        assert pki.pem_join(rig.authority().roots) != old_root_pem
        rig.call_both_ways()

        # The old root is gone from the bundle; a pod started from the stale file still joins.
        rig.reenroll("beta")
        assert rig.status("beta")["bundle"]["sequence"] == ret["bundle_sequence"]
        rig.call_both_ways(fresh_jwt=True)
        rig.renew("beta")
        rig.call_both_ways(fresh_jwt=True)

        rig.no_errors_logged()
        assert rig.failed == [], rig.failed
        assert rig.calls > 40
    finally:
        rig.stop()


def test_a_bootstrap_bundle_from_another_ca_is_not_enough(tmp_path):
    """The endorsement path does not open the door to a CA we never trusted: a sidecar whose
    bootstrap bundle holds an unrelated root never enrolls, and says why."""
    rig = Rig(tmp_path)
    try:
        key = pki.new_key()
        other = pki.build_root(key, dt.datetime.now(dt.UTC))
        (tmp_path / "alpha" / "ca-root.pem").write_text(pki.pem_join([other]))
        rig.stop_pod("alpha")
        p = start_sidecar(rig.configs["alpha"], wait_ready=False)
        rig.procs.append(p)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "no root we trust endorses" not in p.stderr:
            time.sleep(0.1)
        assert "no root we trust endorses" in p.stderr, tail(p.stderr)
        code, doc = admin_get(p, "/ready")
        assert code == 503
        code, doc = admin_get(p, "/status")
        assert doc["bundle"]["source"] == "bootstrap"
    finally:
        rig.stop()
