# Sourced by demo.sh once the CA runs ($work, $url, step, cleanup are set there):
# two plain-HTTP apps, each behind a sidecar, calling each other over mutual TLS.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_line() {  # wait_line FILE PATTERN: print the last word of the first matching line
  for _ in $(seq 200); do
    if grep -q "$2" "$1" 2>/dev/null; then grep -m1 "$2" "$1" | awk '{print $NF}'; return; fi
    sleep 0.05
  done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" "${1%.out}.err" >&2; exit 1
}
pids=()
start() {  # start NAME CMD...: run in the background, output in $work/NAME.out/.err
  local name=$1; shift
  "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=("$!")
}
cleanup_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  cleanup
}
trap cleanup_all EXIT INT TERM

sidecar_config() {  # sidecar_config NAME SPIFFE-ID EXTRA-YAML (bundle poll 1 s for the demo; 30 s default)
  mkdir -p "$work/$1"
  cp "$work/bundle.pem" "$work/$1/ca-root.pem"
  meshca token --home "$work/ca" --spiffe-id "$2" >"$work/$1/token"
  printf 'trust_domain: cluster.local\nca: {url: "%s", bundle: ca-root.pem, token_file: token, bundle_poll: 1}\nadmin: {listen: "127.0.0.1:0"}\nhealth: {listen: "127.0.0.1:0"}\n%s\n' \
    "$url" "$3" >"$work/$1/sidecar.yaml"
}

step "backend: a plain-HTTP app on 127.0.0.1 behind its sidecar (mTLS, JWT, policy)"
backend_port=$(free_port)
start backend-app python3 -m services.backend --listen "127.0.0.1:$backend_port"
sidecar_config backend spiffe://cluster.local/ns/default/sa/backend \
  "inbound: {listen: \"127.0.0.1:0\", app: \"127.0.0.1:$backend_port\"}
jwt: {issuers: [{issuer: meshca/cluster.local, audiences: [backend], jwks_uri: \"$url/v1/jwks\"}]}
policy: {file: policy.yaml}"
cat >"$work/backend/policy.yaml" <<'YAML'
# Only frontend, with a JWT-SVID from the CA for audience "backend", may call /process and /headers.
rules:
  - name: no-admin
    action: DENY
    to: {paths: ["/admin", "/admin/*"]}
  - name: frontend-calls
    action: ALLOW
    from:
      principals: ["spiffe://cluster.local/ns/default/sa/frontend"]
      request_principals: ["meshca/cluster.local/*"]
    to: {paths: ["/process", "/headers"], methods: [GET, POST]}
YAML
cat "$work/backend/sidecar.yaml" "$work/backend/policy.yaml"
start backend-sidecar sidecar run --config "$work/backend/sidecar.yaml"
backend_in=$(wait_line "$work/backend-sidecar.out" "inbound listening on" | sed 's|https://||')
backend_admin=$(wait_line "$work/backend-sidecar.out" "admin listening on" | sed 's|http://||')
wait_line "$work/backend-app.out" "listening on" >/dev/null
echo "backend app on 127.0.0.1:$backend_port; its sidecar's inbound on $backend_in"

step "frontend: its sidecar (outbound proxy) and a plain-HTTP app with HTTP_PROXY"
sidecar_config frontend spiffe://cluster.local/ns/default/sa/frontend \
  "outbound: {listen: \"127.0.0.1:0\", services: {backend.default: {endpoints: [\"$backend_in\"], identity: \"spiffe://cluster.local/ns/default/sa/backend\", jwt_audience: backend}}}"
start frontend-sidecar sidecar run --config "$work/frontend/sidecar.yaml"
frontend_out=$(wait_line "$work/frontend-sidecar.out" "outbound listening on")
frontend_admin=$(wait_line "$work/frontend-sidecar.out" "admin listening on" | sed 's|http://||')
frontend_port=$(free_port)
HTTP_PROXY="$frontend_out" start frontend-app python3 -m services.frontend --listen "127.0.0.1:$frontend_port"
wait_line "$work/frontend-app.out" "listening on" >/dev/null
for admin in "$backend_admin" "$frontend_admin"; do
  for _ in $(seq 100); do curl -sf "http://$admin/ready" >/dev/null && break; sleep 0.1; done
done
echo "frontend app on 127.0.0.1:$frontend_port with HTTP_PROXY=$frontend_out"
cat "$work/frontend/sidecar.yaml"

show_call() {
  curl -sS "http://127.0.0.1:$frontend_port/" >"$work/call.json"
  python3 - "$work/call.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("backend answered:", d["backend_status"], json.dumps(d["backend_answer"]))
h = {k.lower(): v for k, v in d["backend_saw_headers"].items()}
print("backend saw X-Forwarded-Client-Cert (written by its own sidecar):")
for part in h["x-forwarded-client-cert"].split(";"):
    print("   ", part)
tok = h.get("authorization", "")
print("backend saw a JWT-SVID from the CA:", (tok[:40] + "...") if tok else "(none)")
PY
}
step "curl the frontend: app -> its sidecar -> mTLS -> backend's sidecar -> backend app"
show_call

step "sidecar identity (as 'kubectl exec POD -c sidecar -- sidecar identity' prints it)"
echo "-- backend"; sidecar identity --admin "$backend_admin"
echo "-- frontend"; sidecar identity --admin "$frontend_admin"

step "sidecar rotate on both, then the same call again"
echo "backend's new serial:  $(sidecar rotate --admin "$backend_admin")"
echo "frontend's new serial: $(sidecar rotate --admin "$frontend_admin")"
show_call
echo "(same Hash: the kept-alive connection opened before the rotation is not dropped;"
echo " new handshakes use the new certificates)"

step "sidecar check: frontend's sidecar handshakes with backend's and checks its ID"
sidecar check "$backend_in" --admin "$frontend_admin" --expect-id spiffe://cluster.local/ns/default/sa/backend

step "policy: /admin is denied, and so is a path backend's policy does not allow"
curl -sS -x "$frontend_out" http://backend.default/admin -w ' HTTP %{http_code}\n'
curl -sS -x "$frontend_out" http://backend.default/ -w ' HTTP %{http_code}\n'

step "no client certificate: backend's sidecar refuses the handshake, the app sees nothing"
curl -sS -k "https://$backend_in/process" -o /dev/null -w 'HTTP %{http_code}\n' 2>&1 || true

step "the access log: one JSON line per request"
grep '^{' "$work/backend-sidecar.out" | tail -n 2
