# Sourced by demo.sh after demo-mesh.sh: traffic management on the outbound path. Two more
# backends ("v2") behind their own sidecars; a second frontend sidecar sends 80 % of its
# calls to v1 (the backend from before) and 20 % to v2, every call with `x-canary: true` to
# v2, and aborts half the calls to /fault. What answered is read from its access log.

step "traffic: two v2 backends, each behind its own sidecar"
v2_in=()
for n in 1 2; do
  port=$(free_port)
  start "v2-app-$n" python3 -m services.backend --listen "127.0.0.1:$port"
  sidecar_config "v2-$n" spiffe://cluster.local/ns/default/sa/backend \
    "inbound: {listen: \"127.0.0.1:0\", app: \"127.0.0.1:$port\"}"
  start "v2-sidecar-$n" sidecar run --config "$work/v2-$n/sidecar.yaml"
  v2_in+=("$(wait_line "$work/v2-sidecar-$n.out" "inbound listening on" | sed 's|https://||')")
  wait_line "$work/v2-app-$n.out" "listening on" >/dev/null
done
echo "v1: $backend_in    v2: ${v2_in[*]}"

step "a frontend sidecar with a canary split, a header route and an injected fault"
sidecar_config canary spiffe://cluster.local/ns/default/sa/frontend "outbound:
  listen: 127.0.0.1:0
  services:
    backend.default:
      identity: spiffe://cluster.local/ns/default/sa/backend
      jwt_audience: backend
      endpoints:
        - {address: \"$backend_in\", labels: {version: v1}}
        - {address: \"${v2_in[0]}\", labels: {version: v2}}
        - {address: \"${v2_in[1]}\", labels: {version: v2}}
      subsets: {v1: {version: v1}, v2: {version: v2}}
      retries: {attempts: 2, retry_on: [connect-failure, reset, 503]}
      routes:
        - name: canary-testers
          match: {headers: {x-canary: \"true\"}}
          to: [{subset: v2}]
        - name: flaky
          match: {path_prefix: /fault}
          fault: {abort: {percent: 50, status: 503}}
        - name: rollout
          match: {path_prefix: /}
          to: [{subset: v1, weight: 80}, {subset: v2, weight: 20}]"
sed -n '/^outbound:/,$p' "$work/canary/sidecar.yaml"
start canary-sidecar sidecar run --config "$work/canary/sidecar.yaml"
canary_out=$(wait_line "$work/canary-sidecar.out" "outbound listening on")
canary_admin=$(wait_line "$work/canary-sidecar.out" "admin listening on" | sed 's|http://||')
for _ in $(seq 100); do curl -sf "http://$canary_admin/ready" >/dev/null && break; sleep 0.1; done

traffic_calls() {  # traffic_calls N PATH [HEADER]: N calls; statuses and which version answered
  python3 - "$canary_out" "$work/canary-sidecar.out" "$backend_in" "$@" <<'PY'
import collections, json, sys, urllib.error, urllib.request
proxy, log, v1, n, path = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
headers = dict([sys.argv[6].split(": ", 1)]) if len(sys.argv) > 6 else {}
before = len(open(log).read().splitlines())
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
statuses = collections.Counter()
for _ in range(n):
    req = urllib.request.Request(f"http://backend.default{path}", headers=headers)
    try:
        with opener.open(req, timeout=10) as r:
            statuses[r.status] += 1
    except urllib.error.HTTPError as e:
        try:
            statuses[f"{e.code} {json.load(e)['error']}"] += 1
        except ValueError:  # not the sidecar's JSON: the app's own answer
            statuses[f"{e.code} from the app"] += 1
lines = [json.loads(l) for l in open(log).read().splitlines()[before:] if l.startswith("{")]
versions = collections.Counter(
    ("v1" if l.get("upstream") == v1 else "v2") for l in lines if l.get("status") == 200
)
print(f"{n} calls to {path} {headers or ''}: statuses {dict(statuses)}; answered by {dict(versions)}")
PY
}
step "200 calls: the rollout route splits 80/20 between v1 and v2"
traffic_calls 200 /headers
step "20 calls with x-canary: true: all to v2"
traffic_calls 20 /headers "x-canary: true"
step "100 calls to /fault: half are aborted by the sidecar (503 fault_abort), the app never sees them"
traffic_calls 100 /fault
echo "(the other half reach a backend, whose own sidecar's policy answers 403 or its app 404)"
step "sidecar endpoints: what the canary sidecar knows of each endpoint"
sidecar endpoints --admin "$canary_admin"
step "one access-log line: the endpoint that answered is in 'upstream'"
grep '^{' "$work/canary-sidecar.out" | grep '"status":200' | tail -n 1
