"""Sidecar injection on real manifests of each kind: what is added, what is kept, idempotence,
opt-out, and that every result validates against the Kubernetes schema (offline)."""

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from meshca.inject import (
    SCRAPE_ANNOTATIONS,
    SIDECAR_NAME,
    InjectError,
    InjectOptions,
    inject_object,
    inject_yaml,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "k8s" / "workloads.yaml"
K8S_VERSION = "1.37.0"
OPTS = InjectOptions()


def docs():
    return list(yaml.safe_load_all(DATA.read_text()))


def pod_spec(obj):
    kind = obj["kind"]
    if kind == "Pod":
        return obj["metadata"], obj["spec"]
    if kind == "CronJob":
        t = obj["spec"]["jobTemplate"]["spec"]["template"]
    else:
        t = obj["spec"]["template"]
    return t.get("metadata", {}), t["spec"]


def validate(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("index", range(6))  # every workload kind in the file
def test_inject_each_kind(index):
    original = docs()[index]
    out = inject_object(original, OPTS)
    validate(original)
    validate(out)
    meta, spec = pod_spec(out)
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == SIDECAR_NAME and sidecar["restartPolicy"] == "Always"
    assert sidecar["readinessProbe"]["httpGet"]["port"] == 15021
    assert sidecar["securityContext"]["runAsUser"] == 1337
    vols = {v["name"]: v for v in spec["volumes"]}
    token = vols["meshca-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "meshca"
    assert vols["meshca-bundle"]["configMap"]["name"] == "meshca-bundle"
    assert meta["annotations"]["meshca.io/status"] == "injected"
    for c in spec["containers"]:
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["HTTP_PROXY"] in ("http://127.0.0.1:15001", "http://corporate-proxy:3128")
    # everything else is kept as it was
    o_meta, o_spec = pod_spec(original)
    assert [c["image"] for c in spec["containers"]] == [c["image"] for c in o_spec["containers"]]
    assert spec["initContainers"][1:] == o_spec.get("initContainers", [])
    o_ann, ann = o_meta.get("annotations", {}), meta["annotations"]
    assert all(ann[k] == v for k, v in o_ann.items())  # the app's annotations are kept
    added = set(ann) - set(o_ann) - {"meshca.io/status"}
    # Prometheus scrapes the sidecar, unless the app has scrape annotations of its own
    if any(k.startswith("prometheus.io/") for k in o_ann):
        assert added == set()
    else:
        assert {k: ann[k] for k in added} == SCRAPE_ANNOTATIONS
    assert {"name": "meshca-metrics", "containerPort": 15090, "protocol": "TCP"} in sidecar["ports"]
    config = yaml.safe_load(sidecar["env"][0]["value"])
    assert config["metrics"] == {"listen": "0.0.0.0:15090"}
    assert original == docs()[index], "the input object is not modified"


def test_app_port_and_sidecar_config():
    dep = inject_object(docs()[0], OPTS)
    _, spec = pod_spec(dep)
    config = yaml.safe_load(spec["initContainers"][0]["env"][0]["value"])
    assert config["inbound"]["app"] == "127.0.0.1:8080"
    assert config["ca"]["token_file"] == "/var/run/secrets/meshca/token"
    daemon = inject_object(docs()[2], OPTS)  # no containerPort: outbound only
    _, spec = pod_spec(daemon)
    assert "inbound" not in yaml.safe_load(spec["initContainers"][0]["env"][0]["value"])


def test_existing_http_proxy_is_kept():
    _, spec = pod_spec(inject_object(docs()[3], OPTS))
    env = [e for e in spec["containers"][0]["env"] if e["name"] == "HTTP_PROXY"]
    assert env == [{"name": "HTTP_PROXY", "value": "http://corporate-proxy:3128"}]


def test_idempotent_and_opt_out():
    text = DATA.read_text()
    once = inject_yaml(text, OPTS)
    assert inject_yaml(once, OPTS) == once
    out = list(yaml.safe_load_all(once))
    opted = [d for d in out if d["metadata"]["name"] == "opted-out"][0]
    assert opted == [d for d in docs() if d["metadata"]["name"] == "opted-out"][0]
    service = [d for d in out if d["kind"] == "Service"][0]
    assert service == docs()[-1]


def test_refusals():
    bad = copy.deepcopy(docs()[5])
    bad["spec"]["containers"] = []
    with pytest.raises(InjectError, match="no containers"):
        inject_object(bad, OPTS)
    clash = copy.deepcopy(docs()[5])
    clash["spec"]["volumes"] = [{"name": "meshca-token", "emptyDir": {}}]
    with pytest.raises(InjectError, match="already exist"):
        inject_object(clash, OPTS)
    with pytest.raises(InjectError, match="not valid YAML"):
        inject_yaml("a: [", OPTS)


def test_intercept_annotation_adds_init_net_first():
    pod = copy.deepcopy(docs()[5])
    pod["metadata"]["annotations"] = {"meshca.io/intercept": "true", "meshca.io/app-port": "9090"}
    out = inject_object(pod, OPTS)
    validate(out)
    init, sidecar = out["spec"]["initContainers"][:2]
    assert init["name"] == "meshca-init" and sidecar["name"] == SIDECAR_NAME
    assert init["args"] == ["init-net", "--uid", "1337", "--app-port", "9090"]
    assert "NET_ADMIN" in init["securityContext"]["capabilities"]["add"]
    assert "restartPolicy" not in init, "a plain init container: runs once, before the sidecar"


@pytest.mark.parametrize(
    "existing,expected",
    [(None, 30), (5, 30), (30, 30), (120, 120)],
)
def test_grace_period_covers_the_sidecar_drain(existing, expected):
    """The injected sidecar drains for `drain_timeout` s after SIGTERM; the pod's grace
    period leaves it that long plus a margin (a longer one is kept)."""
    obj = copy.deepcopy(docs()[0])
    _, spec = pod_spec(obj)
    spec.pop("terminationGracePeriodSeconds", None)
    if existing is not None:
        spec["terminationGracePeriodSeconds"] = existing
    out = inject_object(obj, OPTS)
    _, spec = pod_spec(out)
    assert spec["terminationGracePeriodSeconds"] == expected
    config = yaml.safe_load(spec["initContainers"][0]["env"][0]["value"])
    assert config["drain_timeout"] == OPTS.drain_seconds == 20
    assert expected >= config["drain_timeout"] + 10
    validate(out)
    longer = inject_object(obj, InjectOptions(drain_seconds=60))
    assert pod_spec(longer)[1]["terminationGracePeriodSeconds"] == max(70, existing or 0)


@pytest.mark.parametrize("index", range(6))  # every workload kind in the file
def test_generated_sidecar_config_is_what_the_sidecar_reads(index, tmp_path):
    """The configuration injection writes is parsed by `sidecar.config` without a problem:
    the contract between `meshca inject` and `sidecar run --config-env`."""
    from sidecar.config import load_config

    _, spec = pod_spec(inject_object(docs()[index], OPTS))
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == SIDECAR_NAME
    assert sidecar["args"][-2:] == ["--config-env", "MESHCA_SIDECAR_CONFIG"]
    text = {e["name"]: e.get("value") for e in sidecar["env"]}["MESHCA_SIDECAR_CONFIG"]
    # The files it names are the pod's mounted volumes: made here under a stand-in root.
    doc = yaml.safe_load(text)
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    for key in ("bundle", "token_file"):
        path = Path(doc["ca"][key])
        assert any(str(path).startswith(m + "/") for m in mounts), (key, path, mounts)
        local = tmp_path / path.relative_to("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("x")
        text = text.replace(str(path), str(local))
    config = load_config(tmp_path / "$MESHCA_SIDECAR_CONFIG", text)
    assert config.trust_domain == OPTS.trust_domain
    assert config.ca.url == OPTS.ca_url
    assert (config.admin.port, config.health.port) == (15000, 15021)
    if config.outbound is not None:
        assert config.outbound.listen.port == 15001
    if config.inbound is not None:
        assert config.inbound.listen.port == 15006


@pytest.mark.parametrize(
    "annotation,port_name,expected",
    [
        ("grpc", None, "http2"),
        ("tcp", None, "tcp"),
        ("HTTP2", None, "http2"),
        (None, "grpc-api", "http2"),
        (None, "redis", "tcp"),
        (None, "tcp-db", "tcp"),
        (None, "grpc-web", "http"),
        (None, "web", "http"),
        ("http", "grpc", "http"),  # the annotation wins
    ],
)
def test_app_protocol_from_the_annotation_or_the_port_name(annotation, port_name, expected):
    pod = copy.deepcopy(docs()[0])
    meta, spec = pod_spec(pod)
    if annotation is not None:
        meta.setdefault("annotations", {})["meshca.io/app-protocol"] = annotation
    if port_name is not None:
        spec["containers"][0]["ports"][0]["name"] = port_name
    out = inject_object(pod, OPTS)
    validate(out)
    _, spec = pod_spec(out)
    inbound = yaml.safe_load(spec["initContainers"][0]["env"][0]["value"])["inbound"]
    assert inbound.get("app_protocol", "http") == expected


def test_a_bad_app_protocol_annotation_is_refused_by_name():
    pod = copy.deepcopy(docs()[0])
    meta, _ = pod_spec(pod)
    meta.setdefault("annotations", {})["meshca.io/app-protocol"] = "udp"
    with pytest.raises(InjectError, match="meshca.io/app-protocol"):
        inject_object(pod, OPTS)
