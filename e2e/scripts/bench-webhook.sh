#!/usr/bin/env bash
# make bench's webhook part: ephemera's webhook and
# amazon-eks-pod-identity-webhook (the one most AWS users run) measured the
# same way, in turn (A/B/A/B), on this machine: open loop at 500 requests/s,
# closed loop with 16 connections, CPU time of each webhook's process per
# request, RSS (benches/webhook.rs). The peer runs out of cluster against
# the test bed, which holds the ServiceAccount its reviews name.
#
#   bench-webhook.sh            needs the test bed up (make cluster-up)
#   EPHEMERA_BENCH_NO_PEER=1    ephemera alone (no test bed needed)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CARGO=${CARGO:-cargo}
PEER_DIR=$CACHE/pod-identity-webhook-$POD_IDENTITY_WEBHOOK_VERSION
PEER=$PEER_DIR/amazon-eks-pod-identity-webhook
NAMESPACE=ephemera-bench-peer

if [[ -n ${EPHEMERA_BENCH_NO_PEER:-} ]]; then
  exec "$CARGO" bench --bench webhook
fi

step "amazon-eks-pod-identity-webhook $POD_IDENTITY_WEBHOOK_VERSION (the peer)"
if [[ -x $PEER ]]; then
  ok "cached: $PEER"
else
  mkdir -p "$PEER_DIR" "$BUILD_LOGS"
  log=$BUILD_LOGS/pod-identity-webhook-$POD_IDENTITY_WEBHOOK_VERSION.log
  info "first build on this machine; typical cold time: 1-3 min (~400 packages); log: $log"
  start=$SECONDS
  GOBIN=$PEER_DIR go install -v "github.com/aws/amazon-eks-pod-identity-webhook@$POD_IDENTITY_WEBHOOK_VERSION" \
    >"$log" 2>&1 || {
    tail -n 15 "$log" >&2
    die "building the peer webhook failed; full log: $log"
  }
  ok "built in $((SECONDS - start))s"
fi

[[ -s $STATE/dev.env ]] || die "the test bed is not up: make cluster-up (or EPHEMERA_BENCH_NO_PEER=1)"
# shellcheck source=/dev/null
source "$STATE/dev.env"
step "the peer's ServiceAccount: $NAMESPACE/orders-api, annotated with a role"
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: $NAMESPACE}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: orders-api
  namespace: $NAMESPACE
  annotations:
    eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/orders-api
YAML
ok "applied"

step "webhooks side by side (about 2 min; figures, not assertions)"
EPHEMERA_BENCH_PEER=$PEER EPHEMERA_BENCH_PEER_KUBECONFIG=$KUBECONFIG EPHEMERA_BENCH_PEER_NAMESPACE=$NAMESPACE \
  "$CARGO" bench --bench webhook
