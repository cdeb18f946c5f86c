#!/usr/bin/env bash
# `make demo`: a narrated tour of the local test bed. It shows the pieces the
# identity lifecycle is built from: a pod scheduled onto a fake node, a
# short-lived ServiceAccount token, an IAM role that trusts exactly that
# ServiceAccount, and what happens to access when the role is deleted.
# Then ephemera's own API: the CRDs, a boundary and identities, and the
# controller clamping an identity that asks for too much.
# (The webhook and the per-pod role lifecycle join this tour as they land.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=/dev/null
source "$STATE/dev.env"

NS=ephemera-demo
STEPS=9
n=0
say() {
  n=$((n + 1))
  printf '\n%s[%d/%d] %s%s\n' "$_bold" "$n" "$STEPS" "$*" "$_reset"
}
run() {
  printf '%s$ %s%s\n' "$_dim" "$*" "$_reset"
  "$@"
}

say "The control plane: a real kube-apiserver $KUBERNETES_VERSION with one kwok node"
run kubectl get nodes -o wide
kubectl delete namespace "$NS" --ignore-not-found --wait=true >/dev/null
kubectl create namespace "$NS" >/dev/null
until kubectl -n "$NS" get serviceaccount default >/dev/null 2>&1; do sleep 0.2; done

say "A Job's pod is scheduled onto the kwok node and runs (no containers really run)"
kubectl -n "$NS" create serviceaccount report-writer >/dev/null
kubectl -n "$NS" apply -f - >/dev/null <<'JOB'
apiVersion: batch/v1
kind: Job
metadata:
  name: nightly-report
spec:
  template:
    metadata:
      labels: {app: nightly-report}
    spec:
      serviceAccountName: report-writer
      restartPolicy: Never
      containers:
      - name: report
        image: registry.invalid/report:1
JOB
run kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Running pod -l app=nightly-report --timeout=60s
run kubectl -n "$NS" get pods -o wide

say "Today that pod holds a standing credential: the default token mounted at admission"
run kubectl -n "$NS" get pod -l app=nightly-report \
  -o jsonpath='{range .items[0].spec.volumes[*]}{.name}{"\n"}{end}'
info "(kube-api-access-* is the token ephemera will strip from every governed pod)"

say "A short-lived token for the Job's ServiceAccount, audience sts.amazonaws.com, 10 minutes"
printf '%s$ kubectl -n %s create token report-writer --audience sts.amazonaws.com --duration 10m%s\n' "$_dim" "$NS" "$_reset"
TOKEN=$(kubectl -n "$NS" create token report-writer --audience sts.amazonaws.com --duration 10m)
info "its claims (the token itself is a credential and is not printed):"
printf '%s' "$TOKEN" | python -c '
import base64, json, sys
payload = sys.stdin.read().split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
print(json.dumps({k: claims[k] for k in ("iss", "sub", "aud", "exp")}, indent=2))'

say "An IAM role in MiniStack that trusts only system:serviceaccount:$NS:report-writer"
ROLE=demo-report-writer
python - "$ROLE" "$NS" <<'PY'
import json, os, sys, boto3
role, ns = sys.argv[1:]
host = os.environ["EPHEMERA_OIDC_ISSUER"].removeprefix("https://")
iam = boto3.client("iam")
try:
    iam.delete_role(RoleName=role)
except iam.exceptions.NoSuchEntityException:
    pass
trust = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow",
    "Principal": {"Federated": os.environ["EPHEMERA_OIDC_PROVIDER_ARN"]},
    "Action": "sts:AssumeRoleWithWebIdentity",
    "Condition": {"StringEquals": {f"{host}:sub": f"system:serviceaccount:{ns}:report-writer",
                                   f"{host}:aud": "sts.amazonaws.com"}}}]}
arn = iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
print(f"created {arn}")
PY
ROLE_ARN=arn:aws:iam::$AWS_ACCOUNT:role/$ROLE
TOKEN_FILE=$(mktemp)
trap 'rm -f "$TOKEN_FILE"' EXIT
printf '%s' "$TOKEN" >"$TOKEN_FILE"
workload() {
  env -i PATH="$PATH" AWS_ENDPOINT_URL="$AWS_ENDPOINT_URL" AWS_REGION="$AWS_REGION" AWS_DEFAULT_REGION="$AWS_REGION" \
    AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null \
    AWS_ROLE_ARN="$ROLE_ARN" AWS_WEB_IDENTITY_TOKEN_FILE="$TOKEN_FILE" AWS_ROLE_SESSION_NAME=demo \
    python "$EPHEMERA_ROOT/e2e/workload/assume.py" || true
}
info "the workload (boto3, reading AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE) assumes it:"
workload

say "Delete the role: the same token is refused at once (no ghost identity)"
python -c "import boto3; boto3.client('iam').delete_role(RoleName='$ROLE'); print('deleted $ROLE')"
workload

kubectl delete namespace "$NS" --wait=false >/dev/null

say "Ephemera's API: install the CRDs and start the controller"
info "building ephemera (first time on a machine: 5-10 min; then seconds)"
(cd "$EPHEMERA_ROOT" && cargo build --quiet) || die "cargo build failed"
run kubectl apply --server-side -f "$EPHEMERA_ROOT/crds/"
kubectl wait --for=condition=Established crd --all --timeout=30s >/dev/null
kubectl api-resources >/dev/null # refresh kubectl's discovery cache: the new kinds and the `ephemera` category
CONTROLLER_LOG=$LOGS/controller-demo.log
"$EPHEMERA_ROOT/target/debug/ephemera" controller --admin-addr 127.0.0.1:0 >"$CONTROLLER_LOG" 2>&1 &
CONTROLLER_PID=$!
trap 'rm -f "$TOKEN_FILE"; kill $CONTROLLER_PID 2>/dev/null || true' EXIT
info "controller running (pid $CONTROLLER_PID, log $CONTROLLER_LOG)"

say "A boundary, two identities and their workloads (examples/)"
kubectl delete namespace team-a --ignore-not-found --wait=true --timeout=60s >/dev/null # a previous demo's
run kubectl apply -f "$EPHEMERA_ROOT/examples/"
for wi in nightly-report orders-api; do
  kubectl -n team-a wait --for=condition=Ready "workloadidentity/$wi" --timeout=30s >/dev/null
done
run kubectl get ephemera -A

say "An identity asks for more than its boundary allows: it is narrowed, and says so"
run kubectl -n team-a patch workloadidentity orders-api --type merge \
  -p '{"spec":{"aws":{"statements":[{"actions":["sqs:SendMessage","iam:PassRole"],"resources":["arn:aws:sqs:eu-west-1:123456789012:team-a-orders"]}]}}}'
kubectl -n team-a wait --for=condition=BoundaryViolation workloadidentity/orders-api --timeout=30s >/dev/null
run kubectl -n team-a get workloadidentity orders-api \
  -o jsonpath='{range .status.conditions[*]}{.type}={.status}: {.message}{"\n"}{end}'
# While the controller still runs: the boundary's finalizer withdraws its NetworkPolicy.
kubectl delete identityboundary team-a --timeout=60s >/dev/null
kubectl delete namespace team-a --wait=false >/dev/null

printf '\n%sDone.%s The test bed keeps running: source .ephemera/dev.env to use kubectl; make cluster-down stops it.\n' "$_green" "$_reset"
