#!/usr/bin/env bash
# `make demo`: ephemera as a user runs it, narrated. The operator is installed
# by Helm from its own image onto the test bed's real node; a Job whose
# container really runs an AWS SDK client gets an identity of its own, uses
# it for exactly what it may, exits, and its role is reaped the moment the
# kubelet reports it Succeeded. Timings are printed as they are measured.
# `make demo` builds the image first (make image) and starts the test bed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=/dev/null
source "$STATE/dev.env"

RELEASE=ephemera
RELEASE_NS=ephemera
VERSION=$(crate_version)
ARCHIVE=$EPHEMERA_ROOT/target/image/ephemera-$VERSION.oci.tar
STEPS=8
n=0
say() {
  n=$((n + 1))
  printf '\n%s[%d/%d] %s%s\n' "$_bold" "$n" "$STEPS" "$*" "$_reset"
}
run() {
  printf '%s$ %s%s\n' "$_dim" "$*" "$_reset"
  "$@"
}
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
# RFC 3339 (what the apiserver reports) -> nanoseconds since the epoch.
ns_of() { date -d "$1" +%s%N; }

# A demo interrupted halfway leaves nothing that fails closed behind.
cleanup() {
  local status=$?
  if ((status != 0)); then
    printf '%serror:%s the demo stopped; operator logs: kubectl -n %s logs deploy/%s-controller\n' \
      "$_red" "$_reset" "$RELEASE_NS" "$RELEASE" >&2
  fi
}
trap cleanup EXIT

# A previous demo's leftovers.
if helm status "$RELEASE" -n "$RELEASE_NS" >/dev/null 2>&1; then
  info "removing the previous demo's release"
  helm uninstall "$RELEASE" -n "$RELEASE_NS" --wait --timeout 2m >/dev/null
fi
kubectl delete namespace team-a --ignore-not-found --wait=true --timeout=60s >/dev/null
# (On a fresh test bed the CRDs come with the chart below: nothing to delete.)
if kubectl get crd identityboundaries.ephemera.dev >/dev/null 2>&1; then
  kubectl delete identityboundary team-a --ignore-not-found >/dev/null
fi

say "The test bed: a real kube-apiserver $KUBERNETES_VERSION, a real node and a kwok node"
run kubectl get nodes -o wide
info "$EPHEMERA_NODE_NAME runs containers (containerd + runc, kubelet, kube-proxy, kube-router); kwok-node-0 only pretends"
"$EPHEMERA_ROOT/e2e/scripts/cluster.sh" import "$ARCHIVE" | sed 's/^ *//; s/^/    /'

say "Install ephemera with Helm, from its own image ($(du -h "$ARCHIVE" | cut -f1) archive, FROM scratch)"
kubectl create namespace "$RELEASE_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
VALUES=$(mktemp --suffix .yaml)
trap 'rm -f "$VALUES"; cleanup' EXIT
{
  node_release_values "$RELEASE_NS" ephemera.dev/governed
  echo "clusterName: demo"
  echo "logFormat: text"
} >"$VALUES"
START=$(date +%s%N)
run helm install "$RELEASE" "$EPHEMERA_ROOT/charts/ephemera" -n "$RELEASE_NS" -f "$VALUES" --wait --timeout 2m >/dev/null
info "helm install --wait: every pod Ready in $(ms_since "$START") ms (probes answered by the binary)"
run kubectl -n "$RELEASE_NS" get pods -o wide
run helm test "$RELEASE" -n "$RELEASE_NS" --logs 2>&1 | sed -n '/POD LOGS/,$p'

say "A boundary, and identities clamped to it (examples/); asking for more is refused, naming the field"
run kubectl apply -f "$EPHEMERA_ROOT/examples/00-namespace.yaml" -f "$EPHEMERA_ROOT/examples/10-identityboundary.yaml" \
  -f "$EPHEMERA_ROOT/examples/20-workloadidentity.yaml"
for wi in nightly-report orders-api; do
  kubectl -n team-a wait --for=condition=Ready "workloadidentity/$wi" --timeout=30s >/dev/null
done
run kubectl get ephemera -A
printf '%s$ kubectl -n team-a patch workloadidentity orders-api ... iam:PassRole%s\n' "$_dim" "$_reset"
kubectl -n team-a patch workloadidentity orders-api --type merge \
  -p '{"spec":{"aws":{"statements":[{"actions":["sqs:SendMessage","iam:PassRole"],"resources":["arn:aws:sqs:eu-west-1:123456789012:team-a-orders"]}]}}}' 2>&1 |
  sed 's/^/    /' || true
python "$EPHEMERA_ROOT/e2e/workload/seed_s3.py" team-a-raw/sales.csv team-a-secrets/keys.txt

say "A Job whose container runs the AWS SDK for Go (its default credential chain, nothing else)"
kubectl -n team-a apply -f - >/dev/null <<YAML
apiVersion: batch/v1
kind: Job
metadata: {name: nightly-report}
spec:
  backoffLimit: 0
  template:
    metadata:
      labels: {ephemera.dev/identity: nightly-report}
      annotations: {ephemera.dev/purpose: "nightly sales report", ephemera.dev/owner: "team-a@example.com"}
    spec:
      restartPolicy: Never
      nodeSelector: {$EPHEMERA_NODE_TAINT: "true"}
      tolerations: [{key: $EPHEMERA_NODE_TAINT, operator: Exists}]
      containers:
      - name: report
        image: $EPHEMERA_SDK_PROBE_IMAGE
        imagePullPolicy: Never
        # The identity has kubernetes.rules: ephemera's own API token is expected.
        args: [--get, s3://team-a-raw/sales.csv, --deny, s3://team-a-secrets/keys.txt, --kube-token]
        # Only the endpoint is the test bed's (MiniStack); credentials come from
        # ephemera. (Go's web-identity STS client reads the STS variable only.)
        env:
        - {name: AWS_ENDPOINT_URL, value: "$EPHEMERA_NODE_AWS_ENDPOINT_URL"}
        - {name: AWS_ENDPOINT_URL_STS, value: "$EPHEMERA_NODE_AWS_ENDPOINT_URL"}
YAML
POD=$(kubectl -n team-a wait --for=create pod -l job-name=nightly-report --timeout=30s -o name | head -1)
info "admitted with its own ServiceAccount, projected tokens, its role's env, held by a scheduling gate:"
kubectl -n team-a get "$POD" -o jsonpath='    serviceAccount={.spec.serviceAccountName} automount={.spec.automountServiceAccountToken}{"\n"}    volumes={.spec.volumes[*].name}{"\n"}    AWS_ROLE_ARN={.spec.containers[0].env[?(@.name=="AWS_ROLE_ARN")].value}{"\n"}'
kubectl -n team-a wait --for=jsonpath='{.status.phase}'=Ready identitylease --all --timeout=60s >/dev/null
CREATED=$(kubectl -n team-a get "$POD" -o jsonpath='{.metadata.creationTimestamp}')
info "the role is proven with STS, then the gate is lifted: pod created -> lease Ready in about $((($(date +%s%N) - $(ns_of "$CREATED")) / 1000000)) ms (1 s resolution of creationTimestamp)"
run kubectl -n team-a get identityleases

say "The container runs: what the SDK saw from inside the pod"
kubectl -n team-a wait --for=condition=Complete job/nightly-report --timeout=90s >/dev/null ||
  die "the Job did not complete; kubectl -n team-a logs $POD"
kubectl -n team-a logs "$POD" | tail -1 | python "$EPHEMERA_ROOT/e2e/scripts/probe-report.py"

say "It exited 0; the kubelet marked the pod Succeeded, the Job completed: its role is gone"
ROLE=$(kubectl -n team-a get "$POD" -o jsonpath='{.spec.containers[0].env[?(@.name=="AWS_ROLE_ARN")].value}')
FINISHED=$(kubectl -n team-a get "$POD" -o jsonpath='{.status.containerStatuses[0].state.terminated.finishedAt}')
python - "${ROLE##*/}" <<'PY'
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
GONE=$(date +%s%N)
run kubectl -n team-a get pods,jobs
info "container ended (kubelet: $FINISHED) -> role deleted: about $(((GONE - $(ns_of "$FINISHED")) / 1000000)) ms"
info "(finishedAt has 1 s resolution; the figure includes the kubelet noticing the exit and the Job controller)"
run kubectl -n team-a get events --field-selector "involvedObject.name=${POD#pod/}" \
  -o custom-columns=REASON:.reason,FROM:.source.component,MESSAGE:.message --sort-by=.metadata.creationTimestamp
run kubectl -n team-a get events --field-selector involvedObject.kind=IdentityLease \
  -o custom-columns=REASON:.reason,OBJECT:.involvedObject.name,MESSAGE:.message --sort-by=.metadata.creationTimestamp

say "helm uninstall: the pre-delete hook reaps every identity left, then the operator goes"
START=$(date +%s%N)
run helm uninstall "$RELEASE" -n "$RELEASE_NS" --wait --timeout 3m
info "uninstalled in $(ms_since "$START") ms; identity leases left: $(kubectl get identityleases -A --no-headers 2>/dev/null | wc -l)"
kubectl delete namespace team-a "$RELEASE_NS" --wait=false >/dev/null
kubectl delete identityboundary team-a >/dev/null

printf '\n%sDone.%s The test bed keeps running: source .ephemera/dev.env to use kubectl; make cluster-down stops it.\n' "$_green" "$_reset"
