"""`meshca inject -f -` as istioctl kube-inject is used, and the /v1/inject admission webhook
answering real AdmissionReview documents (JSONPatch out); bad input is refused, never a crash."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml
from helpers import curl, start_ca

DATA = Path(__file__).resolve().parents[1] / "data" / "k8s" / "workloads.yaml"


def test_cli_stdin_stdout():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshca",
            "inject",
            "-f",
            "-",
            "--image",
            "registry.example/meshca:0.1",
        ],
        input=DATA.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    out = list(yaml.safe_load_all(res.stdout))
    assert len(out) == len(list(yaml.safe_load_all(DATA.read_text())))
    for obj in out:
        kubernetes_validate.validate(obj, "1.37.0", strict=True)
    dep = out[0]["spec"]["template"]["spec"]
    assert dep["initContainers"][0]["image"] == "registry.example/meshca:0.1"
    again = subprocess.run(
        [sys.executable, "-m", "meshca", "inject", "-f", "-"],
        input=res.stdout,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert list(yaml.safe_load_all(again.stdout)) == out
    bad = subprocess.run(
        [sys.executable, "-m", "meshca", "inject", "-f", "/nope.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "cannot read" in bad.stderr


def review(pod, uid="7f0b2d1e-3c4a-4f6e-9b8d-1a2b3c4d5e6f"):
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": False,
        },
    }


POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "generateName": "orders-6d5f7c-",
        "namespace": "shop",
        "labels": {"app": "orders"},
    },
    "spec": {
        "serviceAccountName": "orders",
        "containers": [
            {"name": "app", "image": "example/orders:1.4", "ports": [{"containerPort": 8080}]}
        ],
    },
}


def post(ca, doc, tmp_path):
    body = tmp_path / "review.json"
    body.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return curl(
        ca, "/v1/inject", "-H", "Content-Type: application/json", "--data-binary", f"@{body}"
    )


def apply_patch(obj, patch):
    out = json.loads(json.dumps(obj))
    for op in patch:
        assert op["op"] in ("add", "replace")
        key = op["path"].lstrip("/")
        out[key] = op["value"]
    return out


def test_webhook_patches_a_pod(ca, tmp_path):
    status, body, _ = post(ca, review(POD), tmp_path)
    assert status == 200, body
    answer = json.loads(body)
    assert answer["kind"] == "AdmissionReview" and answer["apiVersion"] == "admission.k8s.io/v1"
    resp = answer["response"]
    assert resp["uid"] == "7f0b2d1e-3c4a-4f6e-9b8d-1a2b3c4d5e6f" and resp["allowed"] is True
    assert resp["patchType"] == "JSONPatch"
    patched = apply_patch(POD, json.loads(base64.b64decode(resp["patch"])))
    kubernetes_validate.validate(
        {**patched, "metadata": {**patched["metadata"], "name": "x"}}, "1.37.0", strict=True
    )
    assert patched["spec"]["initContainers"][0]["name"] == "sidecar"
    # already injected (or opted out): allowed, no patch
    status, body, _ = post(ca, review(patched), tmp_path)
    assert "patch" not in json.loads(body)["response"]
    opted = {**POD, "metadata": {**POD["metadata"], "annotations": {"meshca.io/inject": "false"}}}
    status, body, _ = post(ca, review(opted), tmp_path)
    assert json.loads(body)["response"]["allowed"] and "patch" not in json.loads(body)["response"]


def test_webhook_refuses_bad_input_clearly(ca, tmp_path):
    for doc, why in (
        ("not json", "not valid JSON"),
        ("[" * 20000, "not valid JSON"),  # nested past the parser's limit: 400, not 500
        ({"kind": "Pod"}, "not an AdmissionReview"),
        ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1"}, "v1"),
        (
            {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}},
            "request.uid",
        ),
    ):
        status, body, _ = post(ca, doc, tmp_path)
        assert status == 400 and why in json.loads(body)["detail"], body
    # a review that cannot be injected: refused with the reason (fail closed, the default)
    empty = {**POD, "spec": {"containers": []}}
    status, body, _ = post(ca, review(empty), tmp_path)
    resp = json.loads(body)["response"]
    assert (
        status == 200 and resp["allowed"] is False and "no containers" in resp["status"]["message"]
    )
    status, _, _ = curl(ca, "/healthz")
    assert status == 200, "the CA keeps serving"


def test_webhook_fail_open(ca_home, tmp_path):
    ca = start_ca(ca_home, "--inject-fail-open")
    try:
        empty = {**POD, "spec": {"containers": []}}
        status, body, _ = post(ca, review(empty), tmp_path)
        resp = json.loads(body)["response"]
        assert resp["allowed"] is True and "not injected" in resp["warnings"][0]
    finally:
        ca.stop()
