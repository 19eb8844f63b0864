#!/usr/bin/env bash
# `make demo`: a CA on loopback, a "pod" that enrolls with a join token using only
# openssl and curl and renews over mTLS; then two plain-HTTP apps behind sidecars
# calling each other over mutual TLS; then a canary split and an injected fault on the outbound
# path; then the rotation CronJob step by step (intermediate,
# root prepare, activate, retire) with calls after each step. Cleans up after itself.
set -euo pipefail

work=$(mktemp -d /tmp/meshca-demo.XXXXXX)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"; wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]], end="")' "$@"; }
csr_body() { python3 -c 'import json,sys; print(json.dumps({"csr": open(sys.argv[1]).read()}))' "$1"; }

step "meshca init: a root (10 y) and an issuing intermediate (1 y) in $work/ca"
meshca init --home "$work/ca"

step "meshca serve: the enrollment API over HTTPS on a free loopback port"
meshca --log-level WARNING serve --home "$work/ca" --listen 127.0.0.1:0 --reload-interval 0.5 \
  >"$work/serve.out" &
server_pid=$!
for _ in $(seq 100); do grep -q "serving on" "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^meshca: serving on //p' "$work/serve.out")
[ -n "$url" ] || { echo "meshca serve did not start"; exit 1; }
echo "CA at $url"
meshca bundle --home "$work/ca" >"$work/bundle.pem"

step "meshca token: a one-time join token for spiffe://cluster.local/ns/default/sa/web"
token=$(meshca token --home "$work/ca" --spiffe-id spiffe://cluster.local/ns/default/sa/web)
echo "${token:0:24}... (single use, 10 minutes)"

step "the pod: a key and CSR with openssl (asking for names it will not get)"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/web.key" \
  -subj "/CN=anything" -addext "subjectAltName=URI:spiffe://cluster.local/ns/kube-system/sa/admin" \
  -out "$work/web.csr" 2>/dev/null
csr_body "$work/web.csr" >"$work/enroll.json"

step "curl POST /v1/certificates with the token"
curl -sS --cacert "$work/bundle.pem" -H "Authorization: Bearer $token" \
  --data-binary @"$work/enroll.json" "$url/v1/certificates" -o "$work/resp.json" -w 'HTTP %{http_code}\n'
json_field "$work/resp.json" certificate_chain >"$work/web-chain.pem"
echo "spiffe_id: $(json_field "$work/resp.json" spiffe_id)   serial: $(json_field "$work/resp.json" serial)"
openssl x509 -in "$work/web-chain.pem" -noout -subject -issuer -dates -ext subjectAltName,basicConstraints

step "openssl verify -x509_strict, as a client and as a server certificate"
awk 'n>0{print} /END CERTIFICATE/{n++}' "$work/web-chain.pem" >"$work/intermediate.pem"
for purpose in sslclient sslserver; do
  openssl verify -x509_strict -purpose "$purpose" -CAfile "$work/bundle.pem" \
    -untrusted "$work/intermediate.pem" "$work/web-chain.pem"
done

step "the same token again is refused (single use)"
curl -sS --cacert "$work/bundle.pem" -H "Authorization: Bearer $token" \
  --data-binary @"$work/enroll.json" "$url/v1/certificates" -w ' HTTP %{http_code}\n'

step "renewal: a new key, no token, the current certificate over mTLS"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/web2.key" \
  -subj "/CN=web" -out "$work/web2.csr" 2>/dev/null
csr_body "$work/web2.csr" >"$work/renew.json"
curl -sS --cacert "$work/bundle.pem" --cert "$work/web-chain.pem" --key "$work/web.key" \
  --data-binary @"$work/renew.json" "$url/v1/certificates" -o "$work/renew-resp.json" -w 'HTTP %{http_code}\n'
echo "renewed: $(json_field "$work/renew-resp.json" spiffe_id)   serial: $(json_field "$work/renew-resp.json" serial)"

# shellcheck source=deploy/local/demo-mesh.sh
. "$(dirname "$0")/demo-mesh.sh"
# shellcheck source=deploy/local/demo-traffic.sh
. "$(dirname "$0")/demo-traffic.sh"
# shellcheck source=deploy/local/demo-rotation.sh
. "$(dirname "$0")/demo-rotation.sh"

step "meshca certs and meshca status: what the ledger holds"
meshca certs --home "$work/ca"
echo
meshca status --home "$work/ca"
step "done (everything in $work is removed)"
