#!/usr/bin/env bash
# Builds (once) and links every tool the e2e test bed needs:
#   kube    kube-apiserver + kube-controller-manager + kube-scheduler + kubelet
#           + kube-proxy + kubectl (one multi-call binary from e2e/tools/kube,
#           Kubernetes $KUBERNETES_VERSION)
#   etcd    from e2e/tools/etcd
#   kwok    fake nodes (go install)
#   helm    v4 (go install)
#   crictl  the CRI client (go install): the real node's pods are removed
#           through CRI at cluster-down
#   kube-router  NetworkPolicy enforcement on the real node (go install;
#           firewall only: no routing, no service proxy)
#   venv    MiniStack + boto3 (pip)
# Binaries are cached per version under ~/.cache/ephemera, so only the first
# run pays. No registry but the Go module proxy and PyPI is used.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:-} -trimpath"
mkdir -p "$BUILD_LOGS" "$BIN"
TOTAL_STEPS=7
step_no=0

next() {
  step_no=$((step_no + 1))
  step "[$step_no/$TOTAL_STEPS] $*"
}

# go_build NAME OUT LOG TYPICAL -- build|install ARGS...: runs a Go build in
# the background and reports progress every 30 s: elapsed time and how many
# packages have been compiled (`-v` prints each one), against the typical cold
# figure, so a long first build never looks hung. The binary lands in OUT only
# when the build succeeded.
go_build() {
  local name=$1 out=$2 log=$3 typical=$4 verb=$6
  shift 6
  local tmp=$out.tmp.$$
  mkdir -p "$tmp"
  info "first build on this machine; typical cold time: $typical; log: $log"
  local start=$SECONDS
  if [[ $verb == install ]]; then
    # `go install pkg@version` has no -o; GOBIN picks the directory.
    (GOBIN=$tmp exec go install -v "$@") >"$log" 2>&1 &
  else
    (cd "$GO_BUILD_DIR" && exec go build -v -o "$tmp/$name" "$@") >"$log" 2>&1 &
  fi
  local pid=$! last=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if ((SECONDS - last >= 30)); then
      last=$SECONDS
      info "$name: $(fmt_duration $((SECONDS - start))) elapsed, $(grep -c . "$log" || true) packages compiled"
    fi
  done
  if ! wait "$pid"; then
    tail -n 15 "$log" >&2
    rm -rf "$tmp"
    die "building $name failed; full log: $log"
  fi
  mv "$tmp/$name" "$out"
  rm -rf "$tmp"
  ok "$name built in $(fmt_duration $((SECONDS - start)))"
}

# --- Kubernetes control plane -------------------------------------------------
next "Kubernetes $KUBERNETES_VERSION (apiserver, controller-manager, scheduler, kubelet, kube-proxy, kubectl)"
mkdir -p "$KUBE_DIR"
if [[ -x $KUBE_DIR/kube ]]; then
  ok "cached: $KUBE_DIR/kube"
else
  ldflags="-s -w"
  ldflags+=" -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=$(cut -d. -f1 <<<"${KUBERNETES_VERSION#v}")"
  ldflags+=" -X k8s.io/component-base/version.gitMinor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION")"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
  GO_BUILD_DIR=$EPHEMERA_ROOT/e2e/tools/kube go_build kube "$KUBE_DIR/kube" "$BUILD_LOGS/kube-$KUBERNETES_VERSION.log" \
    "15-35 min on 2 cores (~2,600 packages)" -- build -ldflags "$ldflags" .
fi
for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  ln -sfn "$KUBE_DIR/kube" "$BIN/$c"
done

# --- etcd ----------------------------------------------------------------------
next "etcd $ETCD_VERSION"
mkdir -p "$ETCD_DIR"
if [[ -x $ETCD_DIR/etcd ]]; then
  ok "cached: $ETCD_DIR/etcd"
else
  GO_BUILD_DIR=$EPHEMERA_ROOT/e2e/tools/etcd go_build etcd "$ETCD_DIR/etcd" "$BUILD_LOGS/etcd-$ETCD_VERSION.log" \
    "2-4 min (~400 packages)" -- build -ldflags "-s -w" .
fi
ln -sfn "$ETCD_DIR/etcd" "$BIN/etcd"

# go_tool NAME DIR TYPICAL MODULE@VERSION [LDFLAGS]: `go install`s NAME into
# DIR once (TYPICAL: its cold build time), then links it into $BIN.
go_tool() {
  local name=$1 dir=$2 typical=$3 module=$4 ldflags="-s -w ${5:-}"
  mkdir -p "$dir"
  if [[ -x $dir/$name ]]; then
    ok "cached: $dir/$name"
  else
    go_build "$name" "$dir/$name" "$BUILD_LOGS/$name-${module##*@}.log" "$typical" -- install -ldflags "$ldflags" "$module"
  fi
  ln -sfn "$dir/$name" "$BIN/$name"
}

next "kwok $KWOK_VERSION (fake nodes)"
go_tool kwok "$KWOK_DIR" "4-8 min (~900 packages)" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"

next "helm $HELM_VERSION"
go_tool helm "$HELM_DIR" "4-8 min (~900 packages)" "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"

next "crictl $CRICTL_VERSION (CRI client for the real node)"
go_tool crictl "$CRICTL_DIR" "1-2 min (~250 packages)" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"

next "kube-router $KUBE_ROUTER_VERSION (NetworkPolicy on the real node)"
CGO_ENABLED=0 go_tool kube-router "$KUBE_ROUTER_DIR" "4-6 min (~700 packages)" \
  "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION" \
  "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION"

# --- Python: MiniStack and boto3 -------------------------------------------------
next "MiniStack $MINISTACK_VERSION and boto3 (Python venv)"
requirements=$EPHEMERA_ROOT/e2e/ministack/requirements.txt
stamp=$(sha256sum "$requirements" | cut -c1-16)
if [[ -x $VENV_DIR/bin/python && "$(cat "$VENV_DIR/.stamp" 2>/dev/null)" == "$stamp" ]]; then
  ok "cached: $VENV_DIR"
else
  info "creating $VENV_DIR (about 30 s); log: $BUILD_LOGS/venv.log"
  rm -rf "$VENV_DIR"
  {
    python3 -m venv "$VENV_DIR" &&
      "$VENV_DIR/bin/pip" install --disable-pip-version-check -q -r "$requirements"
  } >"$BUILD_LOGS/venv.log" 2>&1 || {
    tail -n 15 "$BUILD_LOGS/venv.log" >&2
    die "installing MiniStack failed; full log: $BUILD_LOGS/venv.log"
  }
  echo "$stamp" >"$VENV_DIR/.stamp"
  ok "venv ready"
fi
# A wrapper, not a symlink: Python finds its venv (pyvenv.cfg) next to the path
# it was started from, which for a symlink in .ephemera/bin is the wrong place.
# Remove first: writing through an old symlink would overwrite its target.
rm -f "$BIN/python"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$VENV_DIR/bin/python" >"$BIN/python"
chmod +x "$BIN/python"
