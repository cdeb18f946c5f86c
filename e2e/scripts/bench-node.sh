#!/usr/bin/env bash
# `make bench-node`: the operator as a user runs it, measured. The chart is
# installed from the local image onto the real node; then
#   1. the operator pods' RSS at idle,
#   2. a burst of BENCH_LEASES pods (default 500) with identities, created at
#      once (on the kwok node: their identities are real, their containers
#      need not be), all ended once Ready: time to all Ready, time to all
#      reaped, and the operator pods' peak RSS,
#   3. the webhook's latency through its Service (ClusterIP, kube-proxy, a
#      pod on the node): wrk, 16 connections, 10 s, dry-run AdmissionReviews
#      of a pod with an identity.
# Figures are printed, not asserted. RSS is VmRSS of the containers'
# processes as the node's kernel sees them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=/dev/null
source "$STATE/dev.env"

N=${BENCH_LEASES:-500}
RELEASE=bench-node
RELEASE_NS=ephemera-bench-node
GOV=bench-node-team
VERSION=$(crate_version)
TMP=$(mktemp -d)

# The release (its hook reaps what is left), the namespaces, the boundary.
remove_release() {
  helm uninstall "$RELEASE" -n "$RELEASE_NS" --wait --timeout 5m >/dev/null 2>&1 || true
  kubectl delete namespace "$GOV" "$RELEASE_NS" --wait=true --timeout=2m >/dev/null 2>&1 || true
  kubectl delete identityboundary "$GOV" --ignore-not-found >/dev/null 2>&1 || true
}
trap 'remove_release; rm -rf "$TMP"' EXIT
command -v wrk >/dev/null || apt_install wrk

# rss COMPONENT: the VmRSS (MiB) of each of the release's COMPONENT processes.
rss() {
  ps -eo rss=,args= | awk -v c="$1" '$2 == "/ephemera" && $3 == c {printf "%.1f ", $1 / 1024}'
}
# peak COMPONENT FILE: the highest RSS seen so far, kept in FILE.
peak() {
  local now
  for now in $(rss "$1"); do
    awk -v a="$now" -v b="$(cat "$2" 2>/dev/null || echo 0)" 'BEGIN {print (a > b ? a : b)}' >"$2"
  done
}
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
# within SECONDS WHAT: fail, saying what did not happen, once SECONDS have
# passed since START.
within() {
  (($(ms_since "$START") < $1 * 1000)) || die "no $2 after $1 s"
}

step "installing the chart from ephemera.local/ephemera:$VERSION onto the real node"
remove_release # a previous run's
kubectl create namespace "$RELEASE_NS" >/dev/null
node_release_values "$RELEASE_NS" ephemera.dev/bench-node >"$TMP/values.yaml"
echo "clusterName: $RELEASE" >>"$TMP/values.yaml"
# MiniStack reports a quota of 1,000 roles: BENCH_LEASES may need more.
echo "aws: {roleLimit: 100000}" >"$TMP/bench-values.yaml"
helm install "$RELEASE" "$EPHEMERA_ROOT/charts/ephemera" -n "$RELEASE_NS" -f "$TMP/values.yaml" \
  -f "$TMP/bench-values.yaml" --wait --timeout 3m >/dev/null
sleep 5 # let the pods settle after their start
ok "idle RSS (MiB): controllers $(rss controller)| webhooks $(rss webhook)"

step "a burst of $N pods with identities, then all ended"
kubectl create namespace "$GOV" >/dev/null
kubectl label namespace "$GOV" ephemera.dev/bench-node=true bench-team="$GOV" >/dev/null
kubectl apply -f - >/dev/null <<YAML
apiVersion: ephemera.dev/v1alpha1
kind: IdentityBoundary
metadata: {name: $GOV}
spec:
  namespaceSelector: {matchLabels: {bench-team: $GOV}}
  aws: {allowedActions: ["s3:Get*"], allowedResources: ["arn:aws:s3:::team-a-*"]}
  maxLeases: 100000
  blockInstanceMetadata: false
---
apiVersion: ephemera.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: worker, namespace: $GOV}
spec:
  aws: {statements: [{actions: ["s3:GetObject"], resources: ["arn:aws:s3:::team-a-bench/*"]}]}
YAML
kubectl -n "$GOV" wait --for=condition=Ready workloadidentity/worker --timeout=60s >/dev/null
# The webhook learns the identity from a watch: one pod admitted with a lease first.
until kubectl -n "$GOV" run warmup --image=registry.invalid/x --labels=ephemera.dev/identity=worker >/dev/null 2>&1; do
  sleep 0.5
done
kubectl -n "$GOV" delete pod warmup --wait=false >/dev/null
# Eight creators at once, as controllers creating pods would: pod i in part i % 8.
for ((i = 0; i < N; i++)); do
  printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: w-%d, labels: {ephemera.dev/identity: worker, bench: node}}\nspec: {containers: [{name: main, image: registry.invalid/x}]}\n---\n' "$i" >>"$TMP/part-$((i % 8))"
done
START=$(date +%s%N)
for part in "$TMP"/part-*; do
  kubectl -n "$GOV" create -f "$part" >/dev/null 2>>"$TMP/create-errors" &
done
ready=0
while ((ready < N)); do
  within 600 "$N leases Ready (kubectl create said: $(tail -3 "$TMP/create-errors" 2>/dev/null))"
  peak controller "$TMP/peak-controller"
  peak webhook "$TMP/peak-webhook"
  ready=$(kubectl -n "$GOV" get identityleases \
    -o jsonpath='{range .items[?(@.status.phase=="Ready")]}x{end}' 2>/dev/null | wc -c)
  sleep 1
done
wait
READY_MS=$(ms_since "$START")
ok "all $N leases Ready $READY_MS ms after the first create; peak RSS (MiB): controller $(cat "$TMP/peak-controller"), webhook $(cat "$TMP/peak-webhook")"
ok "RSS with $N live leases (MiB): controllers $(rss controller)| webhooks $(rss webhook)"
until [[ $(kubectl -n "$GOV" get pods -l bench=node -o jsonpath='{range .items[?(@.status.phase=="Running")]}x{end}' | wc -c) -ge $N ]]; do
  within 600 "$N pods Running on the kwok node"
  sleep 1
done
START=$(date +%s%N)
kubectl -n "$GOV" get pods -l bench=node -o name |
  xargs -P 8 -I{} kubectl -n "$GOV" patch {} --subresource=status --type merge -p '{"status":{"phase":"Succeeded"}}' >/dev/null
ENDED_MS=$(ms_since "$START")
left=$N
while ((left > 0)); do
  within 600 "every lease reaped ($left left)"
  peak controller "$TMP/peak-controller"
  left=$(kubectl -n "$GOV" get identityleases --no-headers 2>/dev/null | wc -l)
  sleep 1
done
ok "all $N ended (patching took $ENDED_MS ms) and reaped $(ms_since "$START") ms after the first end; peak controller RSS $(cat "$TMP/peak-controller") MiB"

step "the webhook through its Service: wrk, 16 connections, 10 s, dry-run reviews"
IP=$(kubectl -n "$RELEASE_NS" get service "$RELEASE-ephemera-webhook" -o jsonpath='{.spec.clusterIP}')
cat >"$TMP/review.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"bench","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"namespace":"$GOV","operation":"CREATE","dryRun":true,"userInfo":{"username":"bench"},"object":{"apiVersion":"v1","kind":"Pod","metadata":{"generateName":"w-","namespace":"$GOV","labels":{"ephemera.dev/identity":"worker"}},"spec":{"containers":[{"name":"main","image":"registry.invalid/x"}]}}}}]]
LUA
wrk -t2 -c16 -d10s --latency -s "$TMP/review.lua" "https://$IP/mutate/pods" | sed 's/^/    /'
ok "webhook RSS after the load (MiB): $(rss webhook)"
