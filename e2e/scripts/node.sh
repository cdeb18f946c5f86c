# The test bed's real node: Debian's containerd and runc, the CNI bridge
# plugin, the kubelet and kube-proxy of e2e/tools/kube, registered with the
# apiserver as system:node:$NODE_NAME, and kube-router enforcing
# NetworkPolicies (firewall only). Sourced by cluster.sh, never run.
#
# Everything it does to the host is recorded or confined so that `node_down`
# undoes it exactly:
#   - one bridge ($NODE_BRIDGE) holding the node address; pods get addresses
#     from $POD_CIDR; IPAM data and CNI config live under $NODE_DIR
#   - containerd's root under $NODE_DIR, its state and socket under $NODE_RUN
#   - every pod cgroup under /sys/fs/cgroup/<controller>/ephemera (kubelet
#     cgroupRoot), and kube-router's CPU cap in /sys/fs/cgroup/cpu/ephemera/kube-router
#   - iptables chains KUBE-* (kubelet, kube-proxy, kube-router) and CNI-*
#     (bridge, portmap); kube-router's ipsets KUBE-SRC-*, KUBE-DST-*
#   - 169.254.169.254 on the bridge: the instance-metadata address is this
#     machine's own while the node runs, so no pod's call ever leaves it (and
#     a test can stand in for the metadata service there)
#   - the sysctls the kubelet and the bridge plugin change, saved before up
#   - the kubelet's /var/log/containers links, libcni's /var/lib/cni cache
# Facts behind the settings: ../shared/REAL-NODE-NOTES.md.

NODE_COMPONENTS=(containerd kubelet kube-proxy kube-router)
# The instance metadata service's address (IPv4).
IMDS_IP=169.254.169.254
CONTAINERD_SOCK=$NODE_RUN/containerd.sock
# Sysctls the kubelet (vm.overcommit_memory, kernel.panic*) and the CNI bridge
# plugin (ip_forward) set; saved at up, restored at down.
NODE_SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward
  net.ipv6.conf.all.forwarding net.ipv4.conf.all.route_localnet)
# Directories outside the test bed's own that the kubelet and libcni create.
NODE_HOST_DIRS=(/var/log/containers /var/lib/cni/results /var/lib/cni /run/containerd/s /run/containerd
  /etc/cni/net.d /etc/cni /var/lib/kubelet/device-plugins /var/lib/kubelet)
# kube-router resyncs every NetworkPolicy after each pod's phase or address
# changes anywhere in the cluster, forking about 30 iptables processes per
# sync: a burst of 500 pods on the kwok node cost it 7 of the burst's 25
# CPU-seconds on this 2-core machine, where on a real cluster it has the
# node's CPUs to itself. It is capped at what its DaemonSet manifests request
# (250m) so it cannot starve the control plane it shares the machine with;
# EPHEMERA_KUBE_ROUTER_MILLICPU=0 lifts the cap.
KUBE_ROUTER_MILLICPU=${EPHEMERA_KUBE_ROUTER_MILLICPU:-250}
# Debian packages the node runs on; installed when missing, never assumed.
NODE_PACKAGES=(containerd runc containernetworking-plugins iptables nftables conntrack ipset)

# cgroup v1 controllers (and the named/unified hierarchies) mounted here.
cgroup_hierarchies() {
  local d
  for d in /sys/fs/cgroup/*/; do
    [[ -e $d/cgroup.procs ]] && echo "${d%/}"
  done
}

node_packages() {
  local missing=() pkg
  for pkg in "${NODE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

# --- configuration ---------------------------------------------------------------

# write_if_changed FILE: stdin into FILE, unless FILE already says exactly
# that. kube-proxy exits when its configuration file is written at all, so an
# idempotent cluster-up must leave unchanged files alone.
write_if_changed() {
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then
    rm -f "$tmp"
  else
    mv -f "$tmp" "$1"
  fi
}

write_node_config() {
  mkdir -p "$NODE_DIR"/{cni/net.d,cni/ipam,containerd,kubelet,kubelet-certs,pod-logs} "$NODE_RUN"
  write_if_changed "$NODE_DIR/containerd.toml" <<TOML
# Written by e2e/scripts/cluster.sh: the test bed node's containerd.
version = 2
root = "$NODE_DIR/containerd"
state = "$NODE_RUN/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$NODE_RUN/containerd.ttrpc.sock"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Root lacks CAP_SYS_RESOURCE here: runc may not lower oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        # runc's default root is /run/containerd/runc, outside the node's dirs.
        Root = "$NODE_RUN/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
TOML
  # isGateway puts the node address on the bridge (made beforehand by
  # node_network_up); ipMasq is off: pods talk only to the node address.
  write_if_changed "$NODE_DIR/cni/net.d/10-ephemera.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "ephemera",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_DIR/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
JSON
  write_if_changed "$NODE_DIR/kubelet.yaml" <<YAML
# Written by e2e/scripts/cluster.sh: the test bed node's kubelet.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
imageServiceEndpoint: unix://$CONTAINERD_SOCK
# cgroup v1 on this machine kind; 1.35+ refuses it unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
# Every pod cgroup under one subtree, so cluster-down removes exactly ours.
cgroupRoot: /ephemera
# Root lacks CAP_SYS_RESOURCE: a negative oom_score_adj cannot be set.
oomScoreAdj: 0
failSwapOn: false
podLogsDir: $NODE_DIR/pod-logs
# The disk is shared with everything else on the machine: never evict or
# garbage-collect images because of it.
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerNode: true
registerWithTaints:
- {key: $NODE_TAINT_KEY, value: "true", effect: NoSchedule}
# No cluster DNS in the test bed: pods get the host's resolver.
resolvConf: /etc/resolv.conf
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
shutdownGracePeriod: 0s
YAML
  write_if_changed "$NODE_DIR/kube-proxy.yaml" <<YAML
# Written by e2e/scripts/cluster.sh: the test bed node's kube-proxy.
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
clusterCIDR: $POD_CIDR
# NodePorts only on the node address, never on the machine's own interfaces,
# and not on loopback (that would set net.ipv4.conf.all.route_localnet).
nodePortAddresses: ["$NODE_IP/32"]
iptables: {localhostNodePorts: false, masqueradeAll: false, minSyncPeriod: 0s, syncPeriod: 30s}
# 0: leave the host's conntrack limits and timeouts as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
oomScoreAdj: 0
YAML
}

# --- up ---------------------------------------------------------------------------

# The bridge exists before the apiserver starts: it listens on the node address.
node_network_up() {
  if ! ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    ip link add "$NODE_BRIDGE" type bridge || die "creating bridge $NODE_BRIDGE failed"
  fi
  # Read whole, not piped into grep -q: with pipefail, grep's early exit
  # would fail the pipeline and send us to add an address that is there.
  local addrs
  addrs=$(ip -o addr show dev "$NODE_BRIDGE")
  [[ $addrs == *"inet $NODE_IP/"* ]] ||
    ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$NODE_BRIDGE" || die "adding $NODE_IP to $NODE_BRIDGE failed"
  [[ $addrs == *"inet $IMDS_IP/32"* ]] ||
    ip addr add "$IMDS_IP/32" dev "$NODE_BRIDGE" || die "adding $IMDS_IP to $NODE_BRIDGE failed"
  ip link set "$NODE_BRIDGE" up
}

# What the node changes and must give back, saved before it changes anything
# (kept by an earlier up that was never taken down).
save_host_state() {
  [[ -s $NODE_STATE/sysctls ]] && return
  mkdir -p "$NODE_STATE"
  if command -v nft >/dev/null; then
    nft list tables >"$NODE_STATE/nft-tables" 2>/dev/null || true
  fi
  local key
  for key in "${NODE_SYSCTLS[@]}"; do
    printf '%s=%s\n' "$key" "$(sysctl -n "$key" 2>/dev/null)"
  done >"$NODE_STATE/sysctls.tmp"
  mv "$NODE_STATE/sysctls.tmp" "$NODE_STATE/sysctls"
  local path
  for path in "${NODE_HOST_DIRS[@]}"; do
    if [[ -e $path ]]; then echo "$path"; fi
  done >"$NODE_STATE/host-dirs"
}

make_cgroup_root() {
  local h
  while read -r h; do
    [[ -d $h/ephemera ]] && continue
    mkdir "$h/ephemera"
    # A new cpuset cgroup starts with no CPUs and no memory nodes.
    if [[ -e $h/cpuset.cpus ]]; then
      cat "$h/cpuset.cpus" >"$h/ephemera/cpuset.cpus"
      cat "$h/cpuset.mems" >"$h/ephemera/cpuset.mems"
    fi
  done < <(cgroup_hierarchies)
}

containerd_ready() { ctr --address "$CONTAINERD_SOCK" version; }
kubelet_ready() { curl -sf "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz"; }
kube_proxy_ready() { curl -sf "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/healthz"; }
# kube-router serves no health port here (it would listen on every address):
# its chains exist once its first sync is done.
kube_router_ready() { iptables -w -S KUBE-ROUTER-INPUT; }
node_ready() { kubectl_admin wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s; }

# node_fail WHAT LOG: one clear line, then no half node left behind.
node_fail() {
  printf '%serror:%s %s; see %s\n' "$_red" "$_reset" "$1" "$2" >&2
  tail -n 5 "$2" 2>/dev/null | sed 's/^/    /' >&2 || true
  info "taking the node down again"
  node_down >/dev/null 2>&1 || true
  exit 1
}

# node_wait NAME TIMEOUT CHECK...: like wait_for, but a failure takes the node down.
node_wait() {
  local name=$1 timeout=$2 start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    pid_alive "$PIDS/$name.pid" || node_fail "$name exited while starting" "$LOGS/$name.log"
    ((SECONDS - start < timeout)) || node_fail "$name not ready after ${timeout}s" "$LOGS/$name.log"
    sleep 0.3
  done
}

node_up() {
  local t0=$SECONDS
  step "starting the real node $NODE_NAME (containerd, kubelet, kube-proxy, kube-router; usually 5-15 s)"
  write_node_config
  make_cgroup_root
  if start containerd; then
    node_wait containerd 30 containerd_ready
  fi
  import_images "${NODE_IMAGES[@]}"
  if start kubelet; then
    node_wait kubelet 60 kubelet_ready
  fi
  if start kube-proxy; then
    node_wait kube-proxy 30 kube_proxy_ready
  fi
  kubectl_admin apply -f - >/dev/null <<'RBAC'
# kube-router's NetworkPolicy controller only reads.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "ephemera-testbed:kube-router"}
rules:
- {apiGroups: [""], resources: [pods, namespaces, nodes, services, endpoints], verbs: [list, watch]}
- {apiGroups: [""], resources: [nodes], verbs: [get]}
- {apiGroups: [networking.k8s.io], resources: [networkpolicies], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "ephemera-testbed:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "ephemera-testbed:kube-router"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:kube-router"}
RBAC
  if start kube-router; then
    cap_kube_router
    node_wait kube-router 30 kube_router_ready
  fi
  node_wait kubelet 60 node_ready
  ok "node $NODE_NAME Ready after $((SECONDS - t0))s (pods on $POD_CIDR, node address $NODE_IP, NetworkPolicies enforced)"
}

# cap_kube_router: kube-router (and the iptables processes it forks from now
# on) into a cgroup of its own with a CPU quota of KUBE_ROUTER_MILLICPU,
# under the node's cgroup root (remove_node_cgroups takes it away).
cap_kube_router() {
  local cg=/sys/fs/cgroup/cpu/ephemera/kube-router
  ((KUBE_ROUTER_MILLICPU > 0)) || { info "kube-router's CPU is not capped (EPHEMERA_KUBE_ROUTER_MILLICPU=0)"; return; }
  if [[ ! -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]]; then
    info "no cgroup v1 cpu controller here: kube-router's CPU is not capped"
    return
  fi
  mkdir -p "$cg"
  # A 10 ms period: when throttled it pauses for milliseconds, not for most
  # of 100 ms (its watches must keep being read, or the apiserver holds
  # every pod watcher's events back while its buffer is full).
  echo 10000 >"$cg/cpu.cfs_period_us"
  echo $((KUBE_ROUTER_MILLICPU * 10)) >"$cg/cpu.cfs_quota_us"
  cat "$PIDS/kube-router.pid" >"$cg/cgroup.procs" || node_fail "capping kube-router's CPU failed" "$LOGS/kube-router.log"
  info "kube-router capped at ${KUBE_ROUTER_MILLICPU}m CPU (EPHEMERA_KUBE_ROUTER_MILLICPU=0 lifts the cap)"
}

# import_images ARCHIVE...: OCI archives into containerd's k8s.io namespace;
# pods use them with imagePullPolicy Never (nothing is ever pulled).
import_images() {
  local archive
  for archive in "$@"; do
    [[ -s $archive ]] || die "image archive $archive is missing (e2e/scripts/images.sh builds it)"
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images import --all-platforms "$archive" >>"$LOGS/containerd.log" 2>&1 ||
      node_fail "importing $archive into containerd failed" "$LOGS/containerd.log"
  done
}

# --- down -------------------------------------------------------------------------

# Undoes everything node_up and its processes did to the host; safe to run
# when nothing runs and when a previous down was interrupted.
node_down() {
  # The kubelet first, so it restarts nothing; then every pod sandbox through
  # CRI, which runs CNI DEL (veth, IPAM, portmap chains) and unmounts netns.
  stop_component kubelet || true
  if [[ -S $CONTAINERD_SOCK ]] && containerd_ready >/dev/null 2>&1; then
    timeout 60 "$BIN/crictl" --runtime-endpoint "unix://$CONTAINERD_SOCK" rmp --all --force >>"$LOGS/node-down.log" 2>&1 ||
      info "crictl rmp failed; cleaning up by hand (log: $LOGS/node-down.log)"
  fi
  stop_component kube-proxy || true
  # kube-router leaves its rules and ipsets on SIGTERM (and its
  # --cleanup-config removes nothing): remove_node_iptables and
  # remove_node_ipsets take them away.
  stop_component kube-router || true
  stop_component containerd || true
  # Shims and containers outlive containerd by design; ours name its socket.
  kill_matching "$NODE_RUN/containerd"
  remove_node_mounts
  remove_node_cgroups
  remove_node_iptables
  remove_node_ipsets
  remove_host_files
  rm -rf "$NODE_RUN" "$NODE_DIR"
}

# The bridge, and with it the host state saved before the node changed it.
node_network_down() {
  if ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    ip link del "$NODE_BRIDGE" && ok "removed bridge $NODE_BRIDGE"
  fi
  restore_sysctls
  forget_host_state
}

# kill_matching PATTERN: SIGKILL every process whose command line or
# executable mentions PATTERN (containerd shims), and all their children.
kill_matching() {
  local pids pid
  pids=$(pgrep -f -- "$1" || true)
  [[ -n $pids ]] || return 0
  for pid in $pids; do
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  sleep 0.2
}

# Mounts under the node's directories (kubelet volumes, overlay rootfs, netns),
# deepest first.
remove_node_mounts() {
  local mp
  while read -r mp; do
    umount -l "$mp" 2>/dev/null || true
  done < <(awk '{print $5}' /proc/self/mountinfo | grep -E "^($NODE_DIR|$NODE_RUN)(/|$)" | sort -r)
}

remove_node_cgroups() {
  local h
  while read -r h; do
    [[ -d $h/ephemera ]] || continue
    # Anything still in a pod cgroup is ours and must go first.
    find "$h/ephemera" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    find "$h/ephemera" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done < <(cgroup_hierarchies)
}

# Chains named KUBE-* (kubelet, kube-proxy) or CNI-* (bridge, portmap) and
# every rule that jumps to them; nothing else in the ruleset changes. With the
# nf_tables backend, a table the node's processes created is deleted once it
# is empty again, so iptables-save prints what it printed before up.
remove_node_iptables() {
  local family save restore rules table
  for family in ip ip6; do
    save=${family}tables-save restore=${family}tables-restore
    command -v "$save" >/dev/null || continue
    rules=$("$save" 2>/dev/null) || continue
    if grep -qE '(KUBE|CNI)-' <<<"$rules"; then
      grep -vE '^:(KUBE|CNI)-|^-A (KUBE|CNI)-|-[jg] (KUBE|CNI)-' <<<"$rules" | "$restore" ||
        info "$restore failed; $("$save" | grep -cE '(KUBE|CNI)-') lines of KUBE-/CNI- rules are left"
    fi
    [[ $("$save" --version 2>/dev/null) == *nf_tables* ]] && command -v nft >/dev/null || continue
    while read -r _ _ table; do
      grep -qx "table $family $table" "$NODE_STATE/nft-tables" 2>/dev/null && continue
      # Only base chains with ACCEPT policies and no rule: as if it never existed.
      if ! "$save" -t "$table" 2>/dev/null | grep -qE '^-A |^:[A-Z]+ (DROP|REJECT)'; then
        nft delete table "$family" "$table" 2>/dev/null || true
      fi
    done < <(nft list tables "$family" 2>/dev/null)
  done
}

# kube-router's sets (KUBE-SRC-*, KUBE-DST-*, inet6: for IPv6), once no rule
# uses them.
remove_node_ipsets() {
  command -v ipset >/dev/null || return 0
  local set
  while read -r set; do
    ipset destroy "$set" 2>/dev/null || info "ipset $set could not be destroyed"
  done < <(ipset list -n 2>/dev/null | grep -E '^(inet6:)?KUBE-(SRC|DST)-' || true)
}

restore_sysctls() {
  [[ -s $NODE_STATE/sysctls ]] || return 0
  local line
  while IFS= read -r line; do
    [[ -n ${line#*=} ]] && sysctl -q -w "$line" >/dev/null 2>&1
  done <"$NODE_STATE/sysctls"
  rm -f "$NODE_STATE/sysctls"
}

# Fixed paths outside the node's directories: the kubelet links every
# container's log into /var/log/containers, libcni caches each attachment in
# /var/lib/cni/results. Our entries go; a directory goes too when it was not
# there before up and nothing else is in it.
remove_host_files() {
  if [[ -d /var/log/containers ]]; then
    find /var/log/containers -maxdepth 1 -type l -lname "$NODE_DIR/*" -delete 2>/dev/null || true
  fi
  rm -f /var/lib/cni/results/ephemera-* 2>/dev/null || true
  # containerd's own loopback attachments: ours when the cache is ours.
  grep -qx /var/lib/cni/results "$NODE_STATE/host-dirs" 2>/dev/null || rm -f /var/lib/cni/results/cni-loopback-*
  # containerd 1.6's shims put their sockets in /run/containerd/s whatever
  # its state dir is (a constant in its shim package); ours are gone once
  # the shims are, but a shim killed by down leaves its socket. When the
  # directory was not there before up, everything in it is ours.
  if ! grep -qx /run/containerd/s "$NODE_STATE/host-dirs" 2>/dev/null && [[ -d /run/containerd/s ]]; then
    find /run/containerd/s -maxdepth 1 -type s -delete 2>/dev/null || true
  fi
  # An earlier test bed's runc root (before it moved under the node's run dir).
  grep -qx /run/containerd "$NODE_STATE/host-dirs" 2>/dev/null ||
    find /run/containerd/runc -depth -type d -empty -delete 2>/dev/null || true
  # Fixed paths whatever the flags say: the kubelet's device-plugin socket
  # (--root-dir does not move it) and the cni.lock that appears in the
  # default CNI config dir with the first pod's network setup.
  grep -qx /var/lib/kubelet/device-plugins "$NODE_STATE/host-dirs" 2>/dev/null ||
    rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  grep -qx /etc/cni/net.d "$NODE_STATE/host-dirs" 2>/dev/null || rm -f /etc/cni/net.d/cni.lock
  local path
  for path in /var/log/containers /var/lib/cni/results /var/lib/cni /run/containerd/s /run/containerd \
    /etc/cni/net.d /etc/cni /var/lib/kubelet/device-plugins /var/lib/kubelet; do
    grep -qx "$path" "$NODE_STATE/host-dirs" 2>/dev/null || rmdir "$path" 2>/dev/null || true
  done
}

# After a complete down, nothing of the node's saved host state is needed.
forget_host_state() { rm -rf "$NODE_STATE"; }
