# Shared by the e2e scripts: paths, ports, versions and small helpers.
# Sourced, never run.

EPHEMERA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../versions.env
source "$EPHEMERA_ROOT/e2e/versions.env"

# Tools are built once per version and kept outside the repository.
CACHE=${EPHEMERA_CACHE:-$HOME/.cache/ephemera}
# The wrapper modules' own digest is part of the key: adding a component to
# e2e/tools/kube (the kubelet, say) must rebuild, not reuse an older binary.
_module_digest() { cat "$EPHEMERA_ROOT/e2e/tools/$1"/{go.mod,go.sum,main.go} | sha256sum | cut -c1-12; }
KUBE_DIR=$CACHE/kubernetes-$KUBERNETES_VERSION-$(_module_digest kube)
ETCD_DIR=$CACHE/etcd-$ETCD_VERSION-$(_module_digest etcd)
KWOK_DIR=$CACHE/kwok-$KWOK_VERSION
HELM_DIR=$CACHE/helm-$HELM_VERSION
CRICTL_DIR=$CACHE/crictl-$CRICTL_VERSION
KUBE_ROUTER_DIR=$CACHE/kube-router-$KUBE_ROUTER_VERSION
VENV_DIR=$CACHE/venv-ministack-$MINISTACK_VERSION
BUILD_LOGS=$CACHE/logs

# Per-checkout state of the running cluster (git-ignored).
STATE=$EPHEMERA_ROOT/.ephemera
PKI=$STATE/pki
LOGS=$STATE/logs
PIDS=$STATE/pids
BIN=$STATE/bin

# The real node (e2e/scripts/node.sh). Its bridge holds the node address,
# which the apiserver, MiniStack and the kubelet listen on besides loopback:
# pods reach them there, and nothing listens on the machine's other addresses.
NODE_NAME=ephemera-node-0
NODE_BRIDGE=${EPHEMERA_NODE_BRIDGE:-ephemera0}
POD_CIDR=${EPHEMERA_POD_CIDR:-10.89.0.0/24}
NODE_IP=${POD_CIDR%.*/*}.1
# Pods that must really run tolerate this taint and select the label; every
# other pod stays on the kwok node.
NODE_TAINT_KEY=ephemera.dev/real-node
NODE_DIR=$STATE/node
# containerd's sandbox image, built by e2e/scripts/images.sh.
PAUSE_IMAGE=ephemera.local/pause:3.10
# Sockets live under /run: a clone's path may be too long for a unix socket.
NODE_RUN=/run/ephemera-node
# What the node changed on the host and must give back (outlives NODE_DIR).
NODE_STATE=$STATE/host-before-node

# Ports; override any of them from the environment.
ETCD_PORT=${EPHEMERA_ETCD_PORT:-23790}
ETCD_PEER_PORT=${EPHEMERA_ETCD_PEER_PORT:-23800}
APISERVER_PORT=${EPHEMERA_APISERVER_PORT:-16443}
CONTROLLER_MANAGER_PORT=${EPHEMERA_CONTROLLER_MANAGER_PORT:-16257}
SCHEDULER_PORT=${EPHEMERA_SCHEDULER_PORT:-16259}
KWOK_PORT=${EPHEMERA_KWOK_PORT:-16250}
MINISTACK_PORT=${EPHEMERA_MINISTACK_PORT:-14566}
KUBELET_PORT=${EPHEMERA_KUBELET_PORT:-16260}
KUBELET_HEALTHZ_PORT=${EPHEMERA_KUBELET_HEALTHZ_PORT:-16261}
KUBE_PROXY_HEALTHZ_PORT=${EPHEMERA_KUBE_PROXY_HEALTHZ_PORT:-16262}
KUBE_PROXY_METRICS_PORT=${EPHEMERA_KUBE_PROXY_METRICS_PORT:-16263}

# The service-account issuer. Only its host matters to IAM: it names the
# OIDC provider (arn:aws:iam::<account>:oidc-provider/<host>) and the trust
# policy condition keys (<host>:sub, <host>:aud).
ISSUER_HOST=oidc.ephemera.test
ISSUER=https://$ISSUER_HOST
AWS_ACCOUNT=000000000000
AWS_TEST_REGION=us-east-1

if [[ -t 1 ]]; then
  _bold=$'\e[1m' _red=$'\e[31m' _green=$'\e[32m' _dim=$'\e[2m' _reset=$'\e[0m'
else
  _bold='' _red='' _green='' _dim='' _reset=''
fi

step() { printf '%s==>%s %s\n' "$_bold" "$_reset" "$*"; }
info() { printf '    %s\n' "$*"; }
ok() { printf '    %sok%s %s\n' "$_green" "$_reset" "$*"; }
die() {
  printf '%serror:%s %s\n' "$_red" "$_reset" "$*" >&2
  exit 1
}

# elapsed SECONDS -> "4m05s"
fmt_duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# port_in_use PORT [HOST]: true when something listens on HOST:PORT (default 127.0.0.1).
port_in_use() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }

# apt_install PACKAGE...: from Debian, without starting any daemon a package
# ships (policy-rc.d answers 101, "action forbidden", to every invoke-rc.d).
# Dies naming the log on failure.
apt_install() {
  local log=$BUILD_LOGS/apt.log own_policy=0 status=0
  ((EUID == 0)) || die "$* missing; install it (apt-get install $*) or run as root"
  mkdir -p "$BUILD_LOGS"
  info "installing $* from Debian (about a minute); log: $log"
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  {
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" ||
      { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; }
  } >>"$log" 2>&1 || status=$?
  if ((own_policy)); then
    rm -f /usr/sbin/policy-rc.d
  fi
  ((status == 0)) || die "apt-get install $* failed; see $log"
  ok "installed $*"
}

# pid_alive PIDFILE: true when the pid file names a live process.
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_for DESCRIPTION TIMEOUT LOG CMD...: retry CMD until it succeeds; on
# timeout, or as soon as the process behind DESCRIPTION exits (when it has a
# pid file), print where to look.
wait_for() {
  local what=$1 timeout=$2 log=$3
  shift 3
  local start=$SECONDS pidfile=${PIDS:-}/$what.pid
  until "$@" >/dev/null 2>&1; do
    if [[ -e $pidfile ]] && ! pid_alive "$pidfile"; then
      tail -n 5 "$log" >&2 || true
      die "$what exited while starting; see $log"
    fi
    if ((SECONDS - start >= timeout)); then
      die "$what not ready after ${timeout}s; see $log"
    fi
    sleep 0.3
  done
}

# === the chart on the real node (make demo, make bench-node) ===============

# Version of the crate, the image's tag.
crate_version() { sed -n 's/^version = "\(.*\)"$/\1/p' "$EPHEMERA_ROOT/Cargo.toml" | head -1; }

# node_release_values NAMESPACE LABEL: Helm values (on stdout) for a release
# of the local image in NAMESPACE whose pods run on the real node, governing
# namespaces labelled LABEL=true. MiniStack's administrator stands in for the
# controller's IRSA role: its keys go into the Secret aws-credentials of
# NAMESPACE, made (or updated) here. kube-router enforces the chart's
# NetworkPolicies and sees the apiserver's real port behind the kubernetes
# Service. Needs dev.env sourced.
node_release_values() {
  local namespace=$1 label=$2
  kubectl -n "$namespace" create secret generic aws-credentials --from-literal=id="$AWS_ACCESS_KEY_ID" \
    --from-literal=secret="$AWS_SECRET_ACCESS_KEY" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  cat <<YAML
image: {repository: ephemera.local/ephemera, tag: "$(crate_version)", pullPolicy: Never}
aws: {accountId: "$AWS_ACCOUNT", endpoint: "$EPHEMERA_NODE_AWS_ENDPOINT_URL", region: "$AWS_REGION"}
controller:
  nodeSelector: {$EPHEMERA_NODE_TAINT: "true"}
  tolerations: [{key: $EPHEMERA_NODE_TAINT, operator: Exists}]
  extraEnv:
    - {name: AWS_ACCESS_KEY_ID, valueFrom: {secretKeyRef: {name: aws-credentials, key: id}}}
    - {name: AWS_SECRET_ACCESS_KEY, valueFrom: {secretKeyRef: {name: aws-credentials, key: secret}}}
webhook:
  nodeSelector: {$EPHEMERA_NODE_TAINT: "true"}
  tolerations: [{key: $EPHEMERA_NODE_TAINT, operator: Exists}]
  namespaceSelector: {matchLabels: {$label: "true"}}
networkPolicy: {apiserver: {ports: [443, 6443, $APISERVER_PORT]}}
YAML
}
