# Sourced by demo.sh after demo-mesh.sh: the rotation CronJob, step by step, with calls
# through both sidecars after each step. The waits are shortened for the demo (the
# CronJob's defaults: activate 1 h after prepare, retire 25 h after activate).

calls_ok=0
calls_failed=0
calls() {  # calls N: N calls frontend app -> both sidecars -> backend app; count the results
  local out
  out=$(python3 - "$1" "$frontend_port" <<'PY'
import json, sys, urllib.request
ok = failed = 0
for _ in range(int(sys.argv[1])):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/", timeout=10) as r:
            ok += json.load(r)["backend_status"] == 200
    except Exception:
        failed += 1
print(ok, int(sys.argv[1]) - ok)
PY
)
  calls_ok=$((calls_ok + ${out% *}))
  calls_failed=$((calls_failed + ${out#* }))
  echo "calls through both sidecars: ${out% *} of $1 succeeded"
}
show_trust() {  # what changed: the CA's issuer, each sidecar's issuer and trusted roots
  python3 - "$work/ca" "$backend_admin" "$frontend_admin" <<'PY'
import json, subprocess, sys, urllib.request
st = json.loads(subprocess.run(["meshca", "status", "--home", sys.argv[1], "--json"],
                               capture_output=True, text=True, check=True).stdout)
print(f"CA: issuing intermediate {st['intermediate']['subject']}, root rotation stage {st['root_rotation']['stage']}")
for name, admin in (("backend", sys.argv[2]), ("frontend", sys.argv[3])):
    ident = json.load(urllib.request.urlopen(f"http://{admin}/identity"))
    bundle = json.load(urllib.request.urlopen(f"http://{admin}/status"))["bundle"]
    roots = ", ".join(r["subject"].split(",")[0] for r in bundle["roots"])
    print(f"{name:9} certificate issued by {ident['issuer'].split(',')[0]}; trusts {roots}")
PY
}
settle() { sleep 1.5; }  # the CA reloads its state and the sidecars poll the bundle every second

step "rotation as the CronJob runs it (deploy/k8s/base/rotation-cronjob.yaml); waits shortened for the demo"
show_trust
calls 10

step "meshca rotate --force-intermediate: a new issuing intermediate under the same root"
echo "(the CronJob does this on its own at 2/3 of the intermediate's year)"
meshca rotate --home "$work/ca" --force-intermediate
settle
sidecar rotate --admin "$backend_admin" >/dev/null   # what each sidecar does at half-life
sidecar rotate --admin "$frontend_admin" >/dev/null
show_trust
calls 10

step "meshca rotate --start-root-rotation: prepare (a new root, published beside the old one)"
meshca rotate --home "$work/ca" --start-root-rotation
settle
show_trust
calls 10

step "meshca rotate: activate (issuing moves under the new root; the CronJob waits 1 h, the demo 2 s)"
meshca rotate --home "$work/ca" --propagation-wait 2
settle
echo "before any sidecar renews (with 24 h leaves, most have not):"
show_trust
calls 10
echo "renewals reach the CA, whose certificate now comes from the new root:"
echo "backend's new serial:  $(sidecar rotate --admin "$backend_admin")"
echo "frontend's new serial: $(sidecar rotate --admin "$frontend_admin")"
show_trust
calls 10

step "meshca rotate: retire (the old root leaves the bundle)"
meshca rotate --home "$work/ca" --retire-wait 2 --dry-run
echo "(the CronJob waits until the last certificate under the old root expires, 24 h here;"
echo " every sidecar has renewed, so the demo forces it)"
meshca rotate --home "$work/ca" --force-retire
settle
show_trust
calls 10

step "every call during the rotation: $calls_ok succeeded, $calls_failed failed"
[ "$calls_failed" -eq 0 ] || { echo "some calls failed"; exit 1; }
