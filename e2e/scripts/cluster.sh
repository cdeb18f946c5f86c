#!/usr/bin/env bash
# The local test bed: a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler), kwok fake nodes, a real node
# (containerd, runc, kubelet, kube-proxy; e2e/scripts/node.sh) and MiniStack
# (IAM/STS), started as plain processes on loopback and the node's bridge
# address.
#
#   cluster.sh up       start what is not running (idempotent); writes .ephemera/dev.env
#   cluster.sh down     stop every process it started, by pid; wipe cluster data
#   cluster.sh status   show what runs
#   cluster.sh import ARCHIVE...   import OCI archives into the real node
#                       (pods use them with imagePullPolicy: Never)
#
# Logs: .ephemera/logs/<component>.log. Pids: .ephemera/pids/<component>.pid.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=node.sh
source "$(dirname "${BASH_SOURCE[0]}")/node.sh"

CONTROL_PLANE=(etcd ministack kube-apiserver kube-controller-manager kube-scheduler kwok)
COMPONENTS=("${CONTROL_PLANE[@]}" "${NODE_COMPONENTS[@]}")

# port_of NAME: the port NAME listens on (none for containerd: a unix socket).
port_of() {
  case $1 in
    etcd) echo "$ETCD_PORT" ;;
    ministack) echo "$MINISTACK_PORT" ;;
    kube-apiserver) echo "$APISERVER_PORT" ;;
    kube-controller-manager) echo "$CONTROLLER_MANAGER_PORT" ;;
    kube-scheduler) echo "$SCHEDULER_PORT" ;;
    kwok) echo "$KWOK_PORT" ;;
    kubelet) echo "$KUBELET_PORT" ;;
    kube-proxy) echo "$KUBE_PROXY_HEALTHZ_PORT" ;;
  esac
}

# host_of NAME: the address its port is checked on.
host_of() {
  case $1 in
    kube-apiserver | kubelet) echo "$NODE_IP" ;;
    *) echo 127.0.0.1 ;;
  esac
}

port_env_of() {
  case $1 in
    etcd) echo EPHEMERA_ETCD_PORT ;;
    ministack) echo EPHEMERA_MINISTACK_PORT ;;
    kube-apiserver) echo EPHEMERA_APISERVER_PORT ;;
    kube-controller-manager) echo EPHEMERA_CONTROLLER_MANAGER_PORT ;;
    kube-scheduler) echo EPHEMERA_SCHEDULER_PORT ;;
    kwok) echo EPHEMERA_KWOK_PORT ;;
    kubelet) echo EPHEMERA_KUBELET_PORT ;;
    kube-proxy) echo EPHEMERA_KUBE_PROXY_HEALTHZ_PORT ;;
  esac
}

# ours NAME: the pid file names a live process that is really NAME (a pid
# recycled by an unrelated process does not count).
ours() {
  local pidfile=$PIDS/$1.pid
  pid_alive "$pidfile" || return 1
  local want=$1
  [[ $1 == ministack ]] && want=launch.py
  [[ $1 == containerd ]] && want=containerd.toml
  tr '\0' ' ' <"/proc/$(cat "$pidfile")/cmdline" 2>/dev/null | grep -q -- "$want"
}

# --- certificates and kubeconfigs -------------------------------------------------

ensure_pki() {
  # A PKI from before the real node lacks its certificates and the node address.
  [[ -s $PKI/.complete && -s $PKI/kube-router.crt ]] && return
  step "generating certificates in $PKI"
  rm -rf "$PKI" && mkdir -p "$PKI"
  (
    cd "$PKI"
    exec 2>>"$LOGS/pki.log"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=ephemera-dev-ca" \
      -keyout ca.key -out ca.crt
    cert() { # cert NAME SUBJECT [SAN]
      openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr"
      local ext
      ext=$(mktemp)
      if [[ -n ${3:-} ]]; then
        printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$3" >"$ext"
      else
        printf 'extendedKeyUsage=clientAuth\n' >"$ext"
      fi
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$ext" -out "$1.crt"
      rm -f "$1.csr" "$ext"
    }
    cert apiserver "/CN=kube-apiserver" \
      "IP:127.0.0.1,IP:$NODE_IP,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    # system:masters: the test bed's administrator (kubectl, tests, demo).
    cert admin "/O=system:masters/CN=ephemera-admin"
    # The bootstrap RBAC policy has roles for these two identities.
    cert controller-manager "/CN=system:kube-controller-manager"
    cert scheduler "/CN=system:kube-scheduler"
    # kwok plays every kubelet at once (node and pod status of any node).
    cert kwok "/O=system:masters/CN=kwok"
    # The real node's kubelet: the Node authorizer and NodeRestriction limit it
    # to its own node and the pods bound to it.
    cert node "/O=system:nodes/CN=system:node:$NODE_NAME"
    # kube-proxy: the bootstrap policy binds system:node-proxier to this user.
    cert kube-proxy "/CN=system:kube-proxy"
    # kube-router (NetworkPolicy): a ClusterRole the node start applies.
    cert kube-router "/CN=system:kube-router"
    # The apiserver's client certificate for the kubelet (logs, exec).
    cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
    # Signs ServiceAccount tokens; the public half verifies them.
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) || die "certificate generation failed; see $LOGS/pki.log"
  for who in admin controller-manager scheduler kwok node kube-proxy kube-router; do
    write_kubeconfig "$who" >"$STATE/$who.kubeconfig"
  done
  date >"$PKI/.complete"
}

write_kubeconfig() {
  cat <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: ephemera-dev
  cluster:
    server: https://$NODE_IP:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $1
  user:
    client-certificate: $PKI/$1.crt
    client-key: $PKI/$1.key
contexts:
- name: ephemera-dev
  context: {cluster: ephemera-dev, user: $1}
current-context: ephemera-dev
KUBECONFIG
}

# --- processes ----------------------------------------------------------------------

command_of() {
  case $1 in
    etcd)
      echo "$BIN/etcd" --name ephemera --data-dir "$STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "ephemera=http://127.0.0.1:$ETCD_PEER_PORT" \
        --unsafe-no-fsync --log-level warn
      ;;
    ministack)
      echo "$BIN/python" "$EPHEMERA_ROOT/e2e/ministack/launch.py"
      ;;
    kube-apiserver)
      # Flags as envtest uses them, plus what ephemera depends on: RBAC and the
      # Node authorizer (with NodeRestriction), a real service-account issuer
      # whose tokens IAM trusts, and the default admission plugins
      # (ServiceAccount among them). It listens on the node address, where
      # pods reach it through the `kubernetes` Service, and calls webhooks
      # behind a Service at their endpoints (the host has no route to
      # ClusterIPs of its own).
      echo "$BIN/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
        --bind-address "$NODE_IP" --secure-port "$APISERVER_PORT" --advertise-address "$NODE_IP" \
        --enable-aggregator-routing=true --enable-admission-plugins NodeRestriction \
        --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types InternalIP \
        --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
        --client-ca-file "$PKI/ca.crt" \
        --authorization-mode Node,RBAC \
        --service-cluster-ip-range 10.96.0.0/16 \
        --service-account-issuer "$ISSUER" \
        --service-account-key-file "$PKI/sa.pub" \
        --service-account-signing-key-file "$PKI/sa.key" \
        --allow-privileged=true --profiling=${EPHEMERA_APISERVER_PROFILING:-false}
      ;;
    kube-controller-manager)
      echo "$BIN/kube-controller-manager" \
        --kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$CONTROLLER_MANAGER_PORT" \
        --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
        --use-service-account-credentials --leader-elect=false \
        --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key"
      ;;
    kube-scheduler)
      echo "$BIN/kube-scheduler" \
        --kubeconfig "$STATE/scheduler.kubeconfig" \
        --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
        --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false
      ;;
    kwok)
      echo "$BIN/kwok" --kubeconfig "$STATE/kwok.kubeconfig" \
        --config "$EPHEMERA_ROOT/e2e/kwok/stages.yaml" \
        --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
        --node-ip 10.0.0.1 --cidr 10.0.0.0/16 --server-address "127.0.0.1:$KWOK_PORT"
      ;;
    containerd)
      echo containerd --config "$NODE_DIR/containerd.toml" --log-level warn
      ;;
    kubelet)
      echo "$BIN/kubelet" --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$STATE/node.kubeconfig" \
        --root-dir "$NODE_DIR/kubelet" --cert-dir "$NODE_DIR/kubelet-certs" \
        --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --node-labels "$NODE_TAINT_KEY=true"
      ;;
    kube-proxy)
      echo "$BIN/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml"
      ;;
    kube-router)
      # NetworkPolicy enforcement only. It finds its node by NODE_NAME first.
      echo env "NODE_NAME=$NODE_NAME" "$BIN/kube-router" --kubeconfig "$STATE/kube-router.kubeconfig" \
        --hostname-override "$NODE_NAME" --run-firewall=true --run-router=false --run-service-proxy=false \
        --run-loadbalancer=false --enable-cni=false --enable-pod-egress=false --enable-ipv4=true \
        --enable-ipv6=false --service-cluster-ip-range 10.96.0.0/16 --health-port=0 --metrics-port=0 \
        --iptables-sync-period=1m --cache-sync-timeout=30s
      ;;
  esac
}

# check_port_free NAME: die with the holder and the variable that moves the
# port when someone else listens on NAME's port.
check_port_free() {
  local port
  port=$(port_of "$1")
  [[ -n $port ]] || return 0
  if port_in_use "$port" "$(host_of "$1")"; then
    local holder
    holder=$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'users:.*' || true)
    die "port $port for $1 is already in use ${holder:+by $holder }and not by this test bed; stop that process or pick another port with $(port_env_of "$1")=<port>"
  fi
}

# start NAME: start NAME unless ours is running; refuse a port someone else holds.
start() {
  local name=$1 pidfile=$PIDS/$1.pid port
  port=$(port_of "$name")
  if ours "$name"; then
    ok "$name already running (pid $(cat "$pidfile"))"
    return 1
  fi
  if [[ $name == containerd && -S $CONTAINERD_SOCK ]] && containerd_ready >/dev/null 2>&1; then
    die "a containerd not started by this test bed serves $CONTAINERD_SOCK; stop it (make cluster-down cleans up this test bed's own)"
  fi
  if [[ -e $pidfile ]]; then
    info "stale pid file $pidfile (process $(cat "$pidfile") is gone); starting $name again"
    rm -f "$pidfile"
  fi
  check_port_free "$name"
  local log=$LOGS/$name.log
  [[ -s $log ]] && mv -f "$log" "$log.1"
  # command_of prints a word list: paths with spaces are not supported.
  # AUTH/BIND_HOST/GATEWAY_PORT/LOG_LEVEL configure MiniStack; the other
  # processes ignore them.
  # shellcheck disable=SC2046
  AUTH=true BIND_HOST=127.0.0.1 GATEWAY_PORT=$MINISTACK_PORT LOG_LEVEL=WARNING \
    EPHEMERA_MINISTACK_EXTRA_BIND=$NODE_IP:$MINISTACK_PORT \
    setsid $(command_of "$name") >"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  info "started $name (pid $!${port:+, port $port}, log $log)"
}

kubectl_admin() { "$BIN/kubectl" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

apiserver_ready() {
  curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://$NODE_IP:$APISERVER_PORT/readyz" | grep -qx ok
}

register_oidc_provider() {
  # IAM trusts the cluster's tokens through an OIDC provider named by the
  # issuer host. MiniStack does not fetch the JWKS, so the thumbprint is only
  # well-formed (the CA's SHA-1 fingerprint).
  local thumb
  thumb=$(openssl x509 -in "$PKI/ca.crt" -noout -fingerprint -sha1 | cut -d= -f2 | tr -d : | tr A-F a-f)
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test "$BIN/python" - "$ISSUER" "$thumb" \
    "http://127.0.0.1:$MINISTACK_PORT" "$AWS_TEST_REGION" >>"$LOGS/ministack.log" 2>&1 <<'PY'
import sys, boto3
issuer, thumb, endpoint, region = sys.argv[1:]
iam = boto3.client("iam", endpoint_url=endpoint, region_name=region)
try:
    iam.create_open_id_connect_provider(Url=issuer, ClientIDList=["sts.amazonaws.com"], ThumbprintList=[thumb])
except iam.exceptions.EntityAlreadyExistsException:
    pass
PY
}

write_env() {
  cat >"$STATE/dev.env" <<ENV
# Written by \`make cluster-up\`: source it to talk to the local test bed.
export KUBECONFIG=$STATE/admin.kubeconfig
# kubectl's discovery cache is keyed by host:port only; a cache left by an
# earlier cluster on the same port would hide this one's resources.
export KUBECACHEDIR=$STATE/kube-cache
export PATH=$BIN:\$PATH
export AWS_ENDPOINT_URL=http://127.0.0.1:$MINISTACK_PORT
export AWS_REGION=$AWS_TEST_REGION
export AWS_DEFAULT_REGION=$AWS_TEST_REGION
# MiniStack's administrator (account $AWS_ACCOUNT); test-only credentials.
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export EPHEMERA_OIDC_ISSUER=$ISSUER
export EPHEMERA_OIDC_PROVIDER_ARN=arn:aws:iam::$AWS_ACCOUNT:oidc-provider/$ISSUER_HOST
export EPHEMERA_E2E_PYTHON=$BIN/python
# The real node: pods that must run select it and tolerate its taint; they
# reach MiniStack and the apiserver at the node address.
export EPHEMERA_NODE_NAME=$NODE_NAME
export EPHEMERA_NODE_TAINT=$NODE_TAINT_KEY
export EPHEMERA_NODE_IP=$NODE_IP
export EPHEMERA_NODE_AWS_ENDPOINT_URL=http://$NODE_IP:$MINISTACK_PORT
export CONTAINER_RUNTIME_ENDPOINT=unix://$CONTAINERD_SOCK
# Imported into the node (imagePullPolicy: Never).
export EPHEMERA_SDK_PROBE_IMAGE=$SDK_PROBE_IMAGE
ENV
}

cmd_up() {
  local t0=$SECONDS
  mkdir -p "$STATE" "$LOGS" "$PIDS"
  "$EPHEMERA_ROOT/e2e/scripts/tools.sh"
  node_packages
  # The pause image (containerd's sandbox) and the AWS SDK workload.
  "$EPHEMERA_ROOT/e2e/scripts/images.sh" pause sdk-probe
  NODE_IMAGES=("$("$EPHEMERA_ROOT/e2e/scripts/images.sh" archive pause)"
    "$("$EPHEMERA_ROOT/e2e/scripts/images.sh" archive sdk-probe)")
  SDK_PROBE_IMAGE=$("$EPHEMERA_ROOT/e2e/scripts/images.sh" ref sdk-probe)
  ensure_pki

  step "starting the control plane and MiniStack on 127.0.0.1 and the node address $NODE_IP"
  # The node address exists before anything is checked on it: probing an
  # address this machine does not have would send traffic off the machine.
  save_host_state
  node_network_up
  # Refuse before starting anything, not halfway through.
  for name in "${COMPONENTS[@]}"; do
    ours "$name" || check_port_free "$name"
  done
  if start etcd; then
    wait_for etcd 30 "$LOGS/etcd.log" curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  fi
  if start ministack; then
    wait_for ministack 60 "$LOGS/ministack.log" curl -sf "http://127.0.0.1:$MINISTACK_PORT/_ministack/health"
  fi
  register_oidc_provider || die "registering the OIDC provider in MiniStack failed; see $LOGS/ministack.log"
  ok "MiniStack: IAM OIDC provider $ISSUER_HOST registered"
  if start kube-apiserver; then
    info "waiting for the apiserver (usually 5-15 s)"
  fi
  wait_for kube-apiserver 90 "$LOGS/kube-apiserver.log" apiserver_ready
  ok "apiserver ready at https://$NODE_IP:$APISERVER_PORT after $((SECONDS - t0))s"
  start kube-controller-manager || true
  start kube-scheduler || true
  start kwok || true

  step "waiting for a Ready kwok node and the default ServiceAccount"
  kubectl_admin apply -f - >/dev/null <<'NODE'
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    type: kwok
    kubernetes.io/hostname: kwok-node-0
    kubernetes.io/os: linux
NODE
  wait_for "node kwok-node-0" 60 "$LOGS/kwok.log" \
    kubectl_admin wait --for=condition=Ready node/kwok-node-0 --timeout=2s
  wait_for "default ServiceAccount" 60 "$LOGS/kube-controller-manager.log" \
    kubectl_admin get serviceaccount default -n default
  node_up
  write_env
  ok "test bed up in $((SECONDS - t0))s"
  info "use it:  source .ephemera/dev.env && kubectl get nodes"
  info "logs:    $LOGS/"
}

# stop_component NAME: SIGTERM, then SIGKILL after 10 s; only a process that
# is really ours (a recycled pid is left alone).
stop_component() {
  local name=$1 pidfile=$PIDS/$1.pid pid
  [[ -e $pidfile ]] || return 1
  if ours "$name"; then
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      info "$name (pid $pid) ignored SIGTERM for 10 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    ok "stopped $name (pid $pid)"
    rm -f "$pidfile"
    return 0
  fi
  info "removing stale pid file for $name"
  rm -f "$pidfile"
  return 1
}

cmd_down() {
  local stopped=0
  mkdir -p "$LOGS"
  # The node first: its pods go through CRI while containerd still runs.
  node_down
  for ((i = ${#CONTROL_PLANE[@]} - 1; i >= 0; i--)); do
    stop_component "${CONTROL_PLANE[i]}" && stopped=$((stopped + 1))
  done
  # The apiserver and MiniStack listened on the bridge: it goes last.
  node_network_down
  # Cluster data goes with the processes: MiniStack keeps IAM in memory, so a
  # kept etcd would describe roles that no longer exist.
  rm -rf "$STATE/etcd" "$STATE/dev.env" "$STATE/kube-cache"
  ((stopped)) || info "nothing was running"
}

cmd_status() {
  local port
  for name in "${COMPONENTS[@]}"; do
    if ours "$name"; then
      port=$(port_of "$name")
      printf '  %-24s running (pid %s%s)\n' "$name" "$(cat "$PIDS/$name.pid")" "${port:+, port $port}"
    else
      printf '  %-24s stopped\n' "$name"
    fi
  done
}

cmd_import() {
  ((${#@})) || die "usage: $0 import ARCHIVE..."
  ours containerd && containerd_ready >/dev/null 2>&1 || die "the real node is not running: make cluster-up"
  local archive
  for archive in "$@"; do
    [[ -s $archive ]] || die "no image archive at $archive"
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images import --all-platforms "$archive" >>"$LOGS/containerd.log" 2>&1 ||
      die "importing $archive into the node failed; see $LOGS/containerd.log"
    ok "imported $archive into $NODE_NAME"
  done
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  import)
    shift
    cmd_import "$@"
    ;;
  *) die "usage: $0 up|down|status|import ARCHIVE..." ;;
esac
