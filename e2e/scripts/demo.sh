#!/usr/bin/env bash
# `make demo`: a narrated tour of the local test bed. It shows the pieces the
# identity lifecycle is built from: a pod scheduled onto a fake node, a
# short-lived ServiceAccount token, an IAM role that trusts exactly that
# ServiceAccount, and what happens to access when the role is deleted.
# Then ephemera itself: the CRDs, a boundary and identities, the webhook
# refusing an identity that asks too much, a Job and a Deployment admitted
# with identities of their own, and the Job's role reaped when it finishes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=/dev/null
source "$STATE/dev.env"

NS=ephemera-demo
STEPS=11
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

say "Ephemera: install the CRDs and run the operator (controller + admission webhook)"
info "building ephemera (first time on a machine: 5-10 min; then seconds)"
(cd "$EPHEMERA_ROOT" && cargo build --quiet) || die "cargo build failed"
run kubectl apply --server-side -f "$EPHEMERA_ROOT/crds/"
kubectl wait --for=condition=Established crd --all --timeout=30s >/dev/null
kubectl api-resources >/dev/null # refresh kubectl's discovery cache: the new kinds and the `ephemera` category
OPERATOR_LOG=$LOGS/operator-demo.log
WEBHOOK_PORT=${EPHEMERA_DEMO_WEBHOOK_PORT:-18443}
cleanup() {
  rm -f "$TOKEN_FILE"
  kill "${OPERATOR_PID:-0}" 2>/dev/null || true
  # The webhook fails closed: never leave it registered without the process.
  kubectl delete mutatingwebhookconfiguration,validatingwebhookconfiguration ephemera-demo --ignore-not-found >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$EPHEMERA_ROOT/target/debug/ephemera" run --admin-addr 127.0.0.1:0 --webhook-admin-addr 127.0.0.1:0 \
  --webhook-addr "127.0.0.1:$WEBHOOK_PORT" --register-url "https://127.0.0.1:$WEBHOOK_PORT" \
  --webhook-configuration ephemera-demo --webhook-namespace-label ephemera.dev/governed=true \
  --cluster-name demo >"$OPERATOR_LOG" 2>&1 &
OPERATOR_PID=$!
for _ in $(seq 1 100); do
  kubectl get mutatingwebhookconfiguration ephemera-demo >/dev/null 2>&1 && break
  kill -0 "$OPERATOR_PID" 2>/dev/null || die "ephemera stopped while starting; see $OPERATOR_LOG"
  sleep 0.2
done
kubectl get mutatingwebhookconfiguration ephemera-demo >/dev/null 2>&1 || die "webhook not registered after 20s; see $OPERATOR_LOG"
info "operator running (pid $OPERATOR_PID, log $OPERATOR_LOG), webhook at https://127.0.0.1:$WEBHOOK_PORT"

say "A boundary and two identities (examples/); the controller clamps each to the boundary"
kubectl delete namespace team-a --ignore-not-found --wait=true --timeout=60s >/dev/null # a previous demo's
run kubectl apply -f "$EPHEMERA_ROOT/examples/00-namespace.yaml" -f "$EPHEMERA_ROOT/examples/10-identityboundary.yaml" \
  -f "$EPHEMERA_ROOT/examples/20-workloadidentity.yaml"
for wi in nightly-report orders-api; do
  kubectl -n team-a wait --for=condition=Ready "workloadidentity/$wi" --timeout=30s >/dev/null
done
run kubectl get ephemera -A

say "Asking for more than the boundary allows is refused at the door, naming the field"
printf '%s$ kubectl -n team-a patch workloadidentity orders-api ... iam:PassRole%s\n' "$_dim" "$_reset"
kubectl -n team-a patch workloadidentity orders-api --type merge \
  -p '{"spec":{"aws":{"statements":[{"actions":["sqs:SendMessage","iam:PassRole"],"resources":["arn:aws:sqs:eu-west-1:123456789012:team-a-orders"]}]}}}' 2>&1 |
  sed 's/^/    /' || true

say "A Job and a Deployment: every pod is admitted with its own ServiceAccount, token and role"
START=$(date +%s%N)
run kubectl apply -f "$EPHEMERA_ROOT/examples/30-job.yaml" -f "$EPHEMERA_ROOT/examples/40-deployment.yaml"
info "pods start held by the scheduling gate ephemera.dev/identity-ready; it is lifted once STS accepts the pod's token"
run kubectl -n team-a wait --for=jsonpath='{.status.phase}'=Ready identitylease --all --timeout=60s
READY_MS=$((($(date +%s%N) - START) / 1000000))
run kubectl -n team-a get identityleases
run kubectl -n team-a get pods -l job-name=nightly-report \
  -o jsonpath='{range .items[*]}{.metadata.name}: serviceAccount={.spec.serviceAccountName} gates={.spec.schedulingGates} volumes={.spec.volumes[*].name}{"\n"}{end}'
info "its roles in MiniStack (IAM), made for these pods and nothing else:"
python - <<'PY'
import boto3
for r in boto3.client("iam").list_roles(PathPrefix="/ephemera/team-a/")["Roles"]:
    print(f"    {r['Arn']}")
PY
info "apply -> every lease Ready: ${READY_MS} ms"

say "The Job finishes: its role, sessions, ServiceAccount and lease are gone at once"
JOB_LEASE=$(kubectl -n team-a get pods -l job-name=nightly-report -o jsonpath='{.items[0].spec.serviceAccountName}')
JOB_ROLE=$(kubectl -n team-a get identitylease "$JOB_LEASE" -o jsonpath='{.status.roleArn}')
info "(no kubelet here: the pod's phase is set as a kubelet would, through the status subresource)"
END=$(date +%s%N)
for pod in $(kubectl -n team-a get pods -l job-name=nightly-report -o name); do
  kubectl -n team-a patch "$pod" --subresource=status --type merge -p '{"status":{"phase":"Succeeded"}}' >/dev/null
done
python - "${JOB_ROLE##*/}" <<'PY'
import sys, time, boto3
iam, role, start = boto3.client("iam"), sys.argv[1], time.time()
while time.time() - start < 60:
    try:
        iam.get_role(RoleName=role)
    except iam.exceptions.NoSuchEntityException:
        break
    time.sleep(0.05)
else:
    sys.exit(f"role {role} still exists after 60 s")
PY
GHOST_MS=$((($(date +%s%N) - END) / 1000000))
run kubectl -n team-a get identityleases
info "pod Succeeded -> Job complete -> role deleted (the ghost window): ${GHOST_MS} ms"
run kubectl -n team-a get events --field-selector involvedObject.kind=IdentityLease \
  -o custom-columns=REASON:.reason,OBJECT:.involvedObject.name,MESSAGE:.message --sort-by=.metadata.creationTimestamp

# Clean up while the operator still runs: the leases of the remaining pods
# carry the reaper finalizer, so their roles are deleted before the namespace
# can go; then the boundary's finalizer withdraws its NetworkPolicy.
info "cleaning up: the remaining identities are reaped with their namespace"
kubectl delete namespace team-a --wait=true --timeout=60s >/dev/null ||
  die "namespace team-a was not deleted within 60 s; see $OPERATOR_LOG"
kubectl delete identityboundary team-a --timeout=60s >/dev/null

printf '\n%sDone.%s The test bed keeps running: source .ephemera/dev.env to use kubectl; make cluster-down stops it.\n' "$_green" "$_reset"
