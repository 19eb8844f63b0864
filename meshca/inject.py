"""Sidecar injection into Kubernetes workloads (pure): `meshca inject` and the admission webhook.

Adds the sidecar as a native sidecar (an init container with `restartPolicy:
Always`, so the app starts after the sidecar is ready and Jobs still complete),
a projected ServiceAccount token for the CA, the CA's bootstrap bundle, the
sidecar's configuration (in an environment variable), readiness on the health
port 15021, `HTTP_PROXY` for the app containers, and a termination grace period
long enough for the sidecar's drain (`drain_timeout` plus a margin; a longer one
the pod already has is kept). Injecting twice equals
injecting once; everything else in the object is kept as it was; the pod
annotation `meshca.io/inject: "false"` opts out.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from meshca import defaults

SIDECAR_NAME = "sidecar"  # as in: kubectl exec POD -c sidecar -- sidecar identity
STATUS_ANNOTATION = "meshca.io/status"
INJECT_ANNOTATION = "meshca.io/inject"
APP_PORT_ANNOTATION = "meshca.io/app-port"
APP_PROTOCOL_ANNOTATION = "meshca.io/app-protocol"  # http | http2 | grpc | tcp
# The app's protocol from its port's name, as Istio reads `<protocol>[-<suffix>]` names.
PORT_NAME_PROTOCOLS = {"http": "http", "http2": "http2", "grpc": "http2", "grpc-web": "http"}
PORT_NAME_PROTOCOLS |= dict.fromkeys(("tcp", "redis", "mongo", "mysql", "postgres"), "tcp")
INTERCEPT_ANNOTATION = "meshca.io/intercept"  # "true": add the init-net container
INIT_NAME = "meshca-init"
OUTBOUND_ANNOTATION = "meshca.io/outbound-services"  # YAML/JSON: name -> endpoints, identity
TOKEN_VOLUME = "meshca-token"  # noqa: S105 (a volume name)
BUNDLE_VOLUME = "meshca-bundle"
TOKEN_DIR = "/var/run/secrets/meshca"  # noqa: S105 (a path)
BUNDLE_DIR = "/var/run/meshca"
CONFIG_ENV = "MESHCA_SIDECAR_CONFIG"
SIDECAR_UID = defaults.SIDECAR_UID  # its own traffic is told apart by this uid (init-net)
DEFAULT_GRACE = 30  # Kubernetes' default terminationGracePeriodSeconds
GRACE_MARGIN = 10  # seconds of the grace period beyond the sidecar's drain_timeout

# Where the pod template lives, per kind.
_TEMPLATE_PATHS = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class InjectError(ValueError):
    """The object cannot be injected; the message says why."""


@dataclass(frozen=True)
class InjectOptions:
    """What the injected sidecar looks like."""

    image: str = defaults.IMAGE
    ca_url: str = defaults.IN_CLUSTER_CA_URL
    trust_domain: str = "cluster.local"
    bundle_configmap: str = "meshca-bundle"
    audience: str = "meshca"
    token_seconds: int = 3600
    drain_seconds: int = 20  # the sidecar's drain_timeout: in-flight requests after SIGTERM


# Where Prometheus (with the usual pod annotations) scrapes the sidecar, as on Istio.
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(defaults.METRICS_PORT),
    "prometheus.io/path": "/stats/prometheus",
}


def sidecar_config(
    opts: InjectOptions,
    app_port: int | None,
    services: dict | None = None,
    app_protocol: str = "http",
) -> str:
    """The sidecar's YAML configuration for a pod."""
    doc: dict[str, Any] = {
        "trust_domain": opts.trust_domain,
        "ca": {
            "url": opts.ca_url,
            "bundle": f"{BUNDLE_DIR}/ca-root.pem",
            "token_file": f"{TOKEN_DIR}/token",
        },
        "outbound": {"listen": f"127.0.0.1:{defaults.OUTBOUND_PORT}", "services": services or {}},
        "admin": {"listen": f"127.0.0.1:{defaults.ADMIN_PORT}"},
        "health": {"listen": f"0.0.0.0:{defaults.HEALTH_PORT}"},
        "metrics": {"listen": f"0.0.0.0:{defaults.METRICS_PORT}"},
        "drain_timeout": opts.drain_seconds,
    }
    if app_port is not None:
        doc["inbound"] = {
            "listen": f"0.0.0.0:{defaults.INBOUND_PORT}",
            "app": f"127.0.0.1:{app_port}",
        }
        if app_protocol != "http":
            doc["inbound"]["app_protocol"] = app_protocol
    return yaml.safe_dump(doc, sort_keys=False)


def _app_port(meta: dict, spec: dict) -> int | None:
    ann = (meta.get("annotations") or {}).get(APP_PORT_ANNOTATION)
    if ann is not None:
        try:
            port = int(ann)
        except ValueError:
            raise InjectError(f"annotation {APP_PORT_ANNOTATION} must be a port number") from None
        if not 1 <= port <= 65535:
            raise InjectError(f"annotation {APP_PORT_ANNOTATION} must be 1..65535")
        return port
    for c in spec.get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("protocol", "TCP") == "TCP" and isinstance(p.get("containerPort"), int):
                return p["containerPort"]
    return None


def _app_protocol(meta: dict, spec: dict, app_port: int | None) -> str:
    """The annotation, else the app port's name (`grpc-api`: http2), else http."""
    ann = (meta.get("annotations") or {}).get(APP_PROTOCOL_ANNOTATION)
    if ann is not None:
        value = str(ann).strip().lower()
        if value not in ("http", "http2", "grpc", "tcp"):
            raise InjectError(
                f"annotation {APP_PROTOCOL_ANNOTATION} must be http, http2, grpc or tcp"
            )
        return "http2" if value == "grpc" else value
    for c in spec.get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("containerPort") == app_port and isinstance(p.get("name"), str):
                prefix = p["name"].lower().split("-", 1)[0]
                if p["name"].lower().startswith("grpc-web"):
                    prefix = "grpc-web"
                return PORT_NAME_PROTOCOLS.get(prefix, "http")
    return "http"


def _services(meta: dict) -> dict | None:
    text = (meta.get("annotations") or {}).get(OUTBOUND_ANNOTATION)
    if text is None:
        return None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        raise InjectError(f"annotation {OUTBOUND_ANNOTATION} is not valid YAML or JSON") from None
    if not isinstance(doc, dict) or not all(
        isinstance(v, dict) and {"endpoints", "identity"} <= set(v) for v in doc.values()
    ):
        raise InjectError(
            f"annotation {OUTBOUND_ANNOTATION} must map service names to endpoints and identity"
        )
    return doc


def _sidecar_container(
    opts: InjectOptions,
    app_port: int | None,
    services: dict | None = None,
    app_protocol: str = "http",
) -> dict:
    probe = {
        "httpGet": {"path": "/healthz/ready", "port": defaults.HEALTH_PORT},
        "periodSeconds": 2,
        "failureThreshold": 30,
    }
    ports = [
        {"name": "meshca-health", "containerPort": defaults.HEALTH_PORT, "protocol": "TCP"},
        {"name": "meshca-metrics", "containerPort": defaults.METRICS_PORT, "protocol": "TCP"},
    ]
    if app_port is not None:
        ports.insert(
            0, {"name": "meshca-inbound", "containerPort": defaults.INBOUND_PORT, "protocol": "TCP"}
        )
    return {
        "name": SIDECAR_NAME,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",  # a native sidecar: starts first, stops last
        "args": ["run", "--config-env", CONFIG_ENV],
        "command": ["sidecar"],
        "env": [
            {"name": CONFIG_ENV, "value": sidecar_config(opts, app_port, services, app_protocol)},
            # the pod's names in the metrics' workload labels (downward API)
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {
                "name": "SIDECAR_WORKLOAD",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}},
            },
        ],
        "ports": ports,
        "startupProbe": probe,
        "readinessProbe": {**probe, "failureThreshold": 3},
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR, "readOnly": True},
        ],
    }


def _init_net_container(opts: InjectOptions, app_port: int | None) -> dict:
    """istio-init's job: NAT rules for transparent interception (needs NET_ADMIN, root)."""
    args = ["init-net", "--uid", str(SIDECAR_UID)]
    if app_port is not None:
        args += ["--app-port", str(app_port)]
    return {
        "name": INIT_NAME,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sidecar"],
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _volumes(opts: InjectOptions) -> list[dict]:
    return [
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": opts.audience,
                            "expirationSeconds": opts.token_seconds,
                            "path": "token",
                        }
                    }
                ]
            },
        },
        {
            "name": BUNDLE_VOLUME,
            "configMap": {
                "name": opts.bundle_configmap,
                "items": [{"key": "ca-root.pem", "path": "ca-root.pem"}],
            },
        },
    ]


def inject_pod_template(meta: dict, spec: dict, opts: InjectOptions) -> bool:
    """Inject into a pod's metadata and spec in place; False if opted out or already done."""
    annotations = meta.get("annotations") or {}
    if str(annotations.get(INJECT_ANNOTATION, "")).lower() == "false":
        return False
    if annotations.get(STATUS_ANNOTATION) == "injected" or any(
        c.get("name") == SIDECAR_NAME for c in spec.get("initContainers") or []
    ):
        return False
    if not spec.get("containers"):
        raise InjectError("the pod has no containers")
    names = {c.get("name") for c in spec["containers"]} | {
        c.get("name") for c in spec.get("initContainers") or []
    }
    if SIDECAR_NAME in names:
        raise InjectError(f"a container is already named {SIDECAR_NAME}")
    vol_names = {v.get("name") for v in spec.get("volumes") or []}
    if vol_names & {TOKEN_VOLUME, BUNDLE_VOLUME}:
        raise InjectError(f"volumes {TOKEN_VOLUME}/{BUNDLE_VOLUME} already exist")
    app_port = _app_port(meta, spec)
    protocol = _app_protocol(meta, spec, app_port)
    sidecar = _sidecar_container(opts, app_port, _services(meta), protocol)
    added = [sidecar]
    if str((meta.get("annotations") or {}).get(INTERCEPT_ANNOTATION, "")).lower() == "true":
        added.insert(0, _init_net_container(opts, app_port))
    spec["initContainers"] = [*added, *(spec.get("initContainers") or [])]
    spec["volumes"] = [*(spec.get("volumes") or []), *_volumes(opts)]
    # SIGKILL must not come before the sidecar's drain is over. A native sidecar gets its
    # SIGTERM once the app containers have exited (so it needs no preStop hook to keep
    # serving the app's last outbound calls); a plain container gets it with the app.
    grace = spec.get("terminationGracePeriodSeconds")
    need = opts.drain_seconds + GRACE_MARGIN
    if not isinstance(grace, int) or grace < need:
        spec["terminationGracePeriodSeconds"] = max(
            need, grace if isinstance(grace, int) else DEFAULT_GRACE
        )
    for c in spec["containers"]:
        env = c.setdefault("env", [])
        have = {e.get("name") for e in env}
        for name, value in (
            ("HTTP_PROXY", f"http://127.0.0.1:{defaults.OUTBOUND_PORT}"),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ):
            if name not in have:
                env.append({"name": name, "value": value})
    ann = meta.setdefault("annotations", {})
    ann[STATUS_ANNOTATION] = "injected"
    if not any(k.startswith("prometheus.io/") for k in ann):  # the app's own scrape wins
        ann.update(SCRAPE_ANNOTATIONS)
    return True


def _dig(obj: dict, path: Iterable[str]) -> dict | None:
    cur: Any = obj
    for key in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur if isinstance(cur, dict) else None


def inject_object(obj: Any, opts: InjectOptions) -> Any:
    """A copy of a Kubernetes object with the sidecar injected (other kinds come back as is)."""
    if not isinstance(obj, dict):
        return obj
    kind = obj.get("kind")
    if kind == "List" and isinstance(obj.get("items"), list):
        out = copy.deepcopy(obj)
        out["items"] = [inject_object(i, opts) for i in obj["items"]]
        return out
    if kind not in _TEMPLATE_PATHS:
        return obj
    out = copy.deepcopy(obj)
    template = out if kind == "Pod" else _dig(out, _TEMPLATE_PATHS[kind])
    if template is None:
        raise InjectError(f"{kind} has no pod template at {'.'.join(_TEMPLATE_PATHS[kind])}")
    meta = template.setdefault("metadata", {})
    spec = template.get("spec")
    if not isinstance(spec, dict):
        raise InjectError(f"{kind} pod template has no spec")
    inject_pod_template(meta, spec, opts)
    return out


def inject_yaml(text: str, opts: InjectOptions) -> str:
    """Inject into every workload of a (multi-document) YAML stream."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise InjectError(f"input is not valid YAML: {e}") from None
    out = [inject_object(d, opts) for d in docs if d is not None]
    return yaml.safe_dump_all(out, sort_keys=False)


def admission_response(review: Any, opts: InjectOptions, fail_open: bool) -> dict:
    """An AdmissionReview v1 answer for a Pod CREATE: the JSONPatch that injects the sidecar.

    Raises InjectError for input that is not an AdmissionReview at all (the caller
    answers 400). An object that cannot be injected is allowed unchanged when
    `fail_open`, else refused with the reason.
    """
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise InjectError("body is not an AdmissionReview")
    if review.get("apiVersion") != "admission.k8s.io/v1":
        raise InjectError("only admission.k8s.io/v1 AdmissionReview is supported")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise InjectError("AdmissionReview has no request.uid")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    pod = request.get("object")
    try:
        if not isinstance(pod, dict) or pod.get("kind", "Pod") != "Pod":
            raise InjectError("request.object is not a Pod")
        meta = copy.deepcopy(pod.get("metadata") or {})
        spec = copy.deepcopy(pod.get("spec") or {})
        if inject_pod_template(meta, spec, opts):
            patch = [
                {"op": "replace" if "spec" in pod else "add", "path": "/spec", "value": spec},
                {
                    "op": "replace" if "metadata" in pod else "add",
                    "path": "/metadata",
                    "value": meta,
                },
            ]
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    except InjectError as e:
        if fail_open:
            response["warnings"] = [f"meshca: sidecar not injected: {e}"]
        else:
            response["allowed"] = False
            response["status"] = {"code": 400, "message": f"meshca: cannot inject: {e}"}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
