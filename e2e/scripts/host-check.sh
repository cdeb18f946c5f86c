#!/usr/bin/env bash
# Proves that the real node gives the host back as it found it:
#
#   host-check.sh [CYCLES]   with the test bed down, snapshot the host; then
#                            CYCLES times (default 3): cluster-up, run a pod
#                            on the real node behind a Service, cluster-down;
#                            snapshot again and fail on any difference.
#
# What is compared: iptables/ip6tables rules, nf_tables tables, ipsets, mounts,
# cgroups, test-bed processes, network links, addresses, routes and netns,
# sysctls (without counters that move on their own), and the files a kubelet
# or CNI plugin writes outside the test bed's directories. It stops a running
# test bed first. Snapshots and diffs: .ephemera/logs/host-check/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CYCLES=${1:-3}
OUT=$LOGS/host-check
CLUSTER=$EPHEMERA_ROOT/e2e/scripts/cluster.sh

# Sysctls that change by themselves (counters, random values, the last pid).
VOLATILE_SYSCTLS='^(fs\.(dentry-state|file-nr|inode-nr|inode-state)|kernel\.(ns_last_pid|random\.)|net\.netfilter\.nf_conntrack_count|fs\.quota\.)'
# Processes a test bed starts; anything else on the machine is not ours to judge.
# Test-bed processes by their name (comm), not by their arguments: a build
# running beside the check (rustc with --extern kube...) is not the test bed.
TESTBED_PROCESSES='^(containerd.*|runc|kubelet|kube-.*|etcd|kwok|pause|sdk-probe|ephemera)$'
# MiniStack runs in Python: its launcher is known by its arguments.
MINISTACK_PROCESS='ministack|launch\.py'

snapshot() {
  local dir=$1
  mkdir -p "$dir"
  # Counters ([packets:bytes]) and the generation comments move on their own.
  { iptables-save 2>/dev/null || true; } | sed '/^#/d; s/ \[[0-9]*:[0-9]*\]$//' >"$dir/iptables"
  { ip6tables-save 2>/dev/null || true; } | sed '/^#/d; s/ \[[0-9]*:[0-9]*\]$//' >"$dir/ip6tables"
  { nft list tables 2>/dev/null || true; } | sort >"$dir/nft-tables"
  { ipset list -n 2>/dev/null || true; } | sort >"$dir/ipsets"
  awk '{print $5, $9}' /proc/self/mountinfo | sort >"$dir/mounts"
  find /sys/fs/cgroup -mindepth 1 -maxdepth 4 -type d 2>/dev/null | sort >"$dir/cgroups"
  ps -eo comm=,args= |
    awk -v re="$TESTBED_PROCESSES" -v py="$MINISTACK_PROCESS" '$1 ~ re || ($1 ~ /^python/ && $0 ~ py)' |
    sort >"$dir/processes"
  ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort >"$dir/links"
  ip -o addr show | awk '{print $2, $3, $4}' | sort >"$dir/addresses"
  { ip route show table all; ip -6 route show table all; } 2>/dev/null | sort >"$dir/routes"
  { ip netns list 2>/dev/null || true; } | sort >"$dir/netns"
  sysctl -a 2>/dev/null | awk -v re="$VOLATILE_SYSCTLS" '$0 !~ re' | sort >"$dir/sysctls"
  local path
  for path in /var/lib/cni /var/log/containers /var/log/pods /run/netns /run/ephemera-node /etc/cni /opt/cni \
    /var/lib/kubelet /var/run/kubernetes /run/containerd /var/lib/containerd; do
    if [[ -e $path ]]; then
      find "$path" 2>/dev/null | sort
    else
      echo "absent $path"
    fi
  done >"$dir/files"
}

main() {
  mkdir -p "$OUT"
  rm -rf "${OUT:?}"/*
  step "host check: $CYCLES x (cluster-up, a pod behind a Service on the real node, cluster-down)"
  info "typical: 40-60 s per cycle; snapshots and diffs in $OUT"
  "$CLUSTER" down >"$OUT/initial-down.log" 2>&1 || die "cluster-down failed; see $OUT/initial-down.log"
  snapshot "$OUT/before"
  local i start
  for ((i = 1; i <= CYCLES; i++)); do
    start=$SECONDS
    "$CLUSTER" up >"$OUT/up-$i.log" 2>&1 || die "cycle $i: cluster-up failed; see $OUT/up-$i.log"
    run_workload "$i" || die "cycle $i: the pod on the real node did not serve; see $OUT/workload-$i.log"
    snapshot "$OUT/up-$i"
    "$CLUSTER" down >"$OUT/down-$i.log" 2>&1 || die "cycle $i: cluster-down failed; see $OUT/down-$i.log"
    ok "cycle $i in $((SECONDS - start))s: up, a pod served through its Service, down"
  done
  snapshot "$OUT/after"
  if ! diff -ru "$OUT/before" "$OUT/after" >"$OUT/diff"; then
    sed 's/^/    /' "$OUT/diff" | head -40 >&2
    die "the host differs after $CYCLES cycles; full diff: $OUT/diff"
  fi
  # The check is only worth something if up really changed the host.
  local changed
  changed=$(diff -rq "$OUT/before" "$OUT/up-1" | sed -E 's#.*/up-1/([a-z0-9-]+) differ#\1#' | tr '\n' ' ' || true)
  [[ -n $changed ]] || die "cluster-up changed nothing on the host: the snapshots see nothing"
  ok "the host is as it was (while up, these differed: ${changed% })"
}

# run_workload CYCLE: a pod on the real node serving HTTP behind a Service,
# reached through its ClusterIP from another pod on the node: exercises
# containerd, runc, CNI (bridge, IPAM, portmap), kube-proxy and cgroups.
run_workload() {
  # shellcheck source=/dev/null
  source "$STATE/dev.env"
  serve_and_fetch >"$OUT/workload-$1.log" 2>&1
}

# serve_and_fetch: fails unless the client pod fetched from the Service.
serve_and_fetch() {
  kubectl apply -f - <<YAML || return 1
apiVersion: v1
kind: Pod
metadata: {name: host-check, namespace: default, labels: {app: host-check}}
spec:
  nodeSelector: {$NODE_TAINT_KEY: "true"}
  tolerations: [{key: $NODE_TAINT_KEY, operator: Exists}]
  containers:
  - name: serve
    image: $EPHEMERA_SDK_PROBE_IMAGE
    imagePullPolicy: Never
    args: [--serve, ":8080"]
    ports: [{containerPort: 8080, hostPort: 18080}]
---
apiVersion: v1
kind: Service
metadata: {name: host-check, namespace: default}
spec:
  selector: {app: host-check}
  ports: [{port: 80, targetPort: 8080}]
YAML
  kubectl wait --for=condition=Ready pod/host-check --timeout=60s || return 1
  local ip start=$SECONDS
  ip=$(kubectl get service host-check -o jsonpath='{.spec.clusterIP}') || return 1
  # kube-proxy programs the Service a moment after its endpoint is ready;
  # until then the ClusterIP refuses connections.
  until [[ $(iptables -w -t nat -S KUBE-SERVICES 2>/dev/null) == *"-d $ip/32"* ]]; do
    ((SECONDS - start < 30)) || { echo "kube-proxy did not program $ip in 30 s"; return 1; }
    sleep 0.2
  done
  kubectl run host-check-client --restart=Never --image="$EPHEMERA_SDK_PROBE_IMAGE" --image-pull-policy=Never \
    --overrides="{\"spec\":{\"nodeSelector\":{\"$NODE_TAINT_KEY\":\"true\"},\"tolerations\":[{\"key\":\"$NODE_TAINT_KEY\",\"operator\":\"Exists\"}]}}" \
    -- --aws=false --fetch "http://$ip/" || return 1
  local served=0
  kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/host-check-client --timeout=60s || served=1
  kubectl logs host-check-client
  return $served
}

main "$@"
