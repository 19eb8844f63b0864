"""The rotation CronJob manifest says what the docs promise (parsed offline)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_rotation_cronjob():
    docs = list(yaml.safe_load_all((ROOT / "deploy/k8s/rotation-cronjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ServiceAccount", "CronJob"}
    cj = kinds["CronJob"]["spec"]
    assert cj["concurrencyPolicy"] == "Forbid"
    assert cj["successfulJobsHistoryLimit"] >= 1 and cj["failedJobsHistoryLimit"] >= 1
    pod = cj["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"]
    [c] = pod["containers"]
    assert c["command"][:2] == ["meshca", "rotate"]
    assert any(a.startswith("--ca-url=https://") for a in c["command"])
    token = pod["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "meshca"
    assert c["securityContext"]["readOnlyRootFilesystem"]
