#!/usr/bin/env bash
# Container images, built offline: buildah into a private store under the cache,
# every image FROM scratch, so nothing is ever pulled.
#
#   images.sh [pause|sdk-probe]...  the test bed's images (both by default): build
#                                   what is missing and print each OCI archive, which
#                                   `ctr -n k8s.io images import` accepts
#   images.sh ref NAME              NAME's image reference  } for the current inputs;
#   images.sh archive NAME          NAME's OCI archive      } fail when not built yet
#   images.sh ephemera              the operator image from ./Dockerfile (`make image`):
#                                   target/image/ephemera-<version>.oci.tar and .digest
#
# The test bed's images (sources in e2e/images/<name>/):
#   pause      ephemera.local/pause:3.10, containerd's sandbox_image
#   sdk-probe  ephemera.local/sdk-probe:<key>, the AWS SDK workload the e2e tests run
# Each is cached by a digest of its inputs (its directory, the recipe below, the
# compiler and buildah versions) in $CACHE/images/<name>-<key>/. The last one
# built is also $CACHE/images/<name>.oci.tar (a symlink) and its reference is
# in $CACHE/images/<name>.ref. Build logs: $BUILD_LOGS/image-<name>.log.
#
# Network: the Go module proxy (sdk-probe's modules, once) and Debian's archive
# (only when buildah or gcc is missing); nothing else.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IMAGES=$CACHE/images
# One buildah store for every image here. Only the OCI archives matter: each
# image is removed from the store once written out.
STORE=$CACHE/buildah
TEST_IMAGES=(pause sdk-probe)

mkdir -p "$IMAGES" "$BUILD_LOGS"

# === tools ===

need_buildah() {
  command -v buildah >/dev/null || apt_install buildah
}

need_gcc_static() {
  # libc.a comes with libc6-dev, which gcc recommends but does not depend on.
  if ! command -v gcc >/dev/null || [[ ! -e /usr/lib/x86_64-linux-gnu/libc.a ]]; then
    apt_install gcc libc6-dev
  fi
}

need_go() {
  command -v go >/dev/null || die "Go >= 1.26 is needed (as for make tools); Debian's is too old"
  local v
  v=$(go env GOVERSION)
  [[ $(printf '%s\n' go1.26 "$v" | sort -V | head -1) == go1.26 ]] ||
    die "$v is too old: sdk-probe's module needs Go >= 1.26"
}

bah() { buildah --root "$STORE/root" --runroot "$STORE/runroot" --storage-driver overlay "$@"; }

# is_static BINARY: no dynamic loader, no shared libraries. ldd prints
# "statically linked" for a static-pie, "not a dynamic executable" otherwise.
is_static() {
  local out
  out=$(ldd "$1" 2>&1 || true)
  [[ $out == *"statically linked"* || $out == *"not a dynamic executable"* ]]
}

# run_logged LOG TYPICAL CMD...: CMD in the background, output to LOG; every
# 30 s the elapsed time against the typical one, so a long build never looks
# hung. On failure: the log's tail and where it is.
run_logged() {
  local log=$1 typical=$2
  shift 2
  local start=$SECONDS last=$SECONDS
  "$@" >>"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if ((SECONDS - last >= 30)); then
      last=$SECONDS
      info "$(fmt_duration $((SECONDS - start))) elapsed (typical: $typical)"
    fi
  done
  if ! wait "$pid"; then
    tail -n 15 "$log" >&2
    die "failed after $(fmt_duration $((SECONDS - start))); full log: $log"
  fi
}

# === test-bed images ===

# Recipes: build_<name> CONTEXT puts the image's files into CONTEXT (the
# image's Dockerfile is copied there too). Their text is part of the cache key.

build_pause() {
  gcc -static -Os -s -Wall -Wextra -Werror -o "$1/pause" "$EPHEMERA_ROOT/e2e/images/pause/pause.c"
}

build_sdk_probe() {
  # Static (no cgo), reproducible (no paths, no VCS stamp), modules pinned by go.sum.
  # GOPROXY without ",direct": modules come from the proxy, never from their origin.
  (cd "$EPHEMERA_ROOT/e2e/images/sdk-probe" &&
    CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly GOPROXY=${GOPROXY:-https://proxy.golang.org} \
      go build -trimpath -buildvcs=false -ldflags '-s -w' -o "$1/sdk-probe" .)
}

# Typical build time on the 2-core CI machine kind, cold (for sdk-probe: an
# empty Go build cache).
typical_time() {
  case $1 in
    pause) echo "5 s" ;;
    sdk-probe) echo "1-2 min cold, 10 s with Go's build cache" ;;
  esac
}

image_ref() {
  case $1 in
    # The tag containerd's sandbox_image names; pause has no releases of its own.
    pause) echo "ephemera.local/pause:3.10" ;;
    # The tag follows the inputs, so a changed probe is never mistaken for an
    # image already imported under the same name.
    sdk-probe) echo "ephemera.local/sdk-probe:${2:0:12}" ;;
  esac
}

known_image() {
  local n
  for n in "${TEST_IMAGES[@]}"; do
    [[ $n == "$1" ]] && return 0
  done
  die "no image $1 (known: ${TEST_IMAGES[*]} ephemera)"
}

# input_key NAME: digest of everything NAME's image is made from.
input_key() {
  local name=$1
  {
    (cd "$EPHEMERA_ROOT/e2e/images/$name" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    declare -f "build_${name//-/_}"
    echo "buildah $(buildah --version)"
    case $name in
      pause) gcc --version | head -1 ;;
      sdk-probe) go env GOVERSION ;;
    esac
  } | sha256sum | cut -c1-16
}

# build_test_image NAME: the image's directory in $IMAGES, built when missing.
build_test_image() {
  local name=$1 key ref dir log start tmp
  key=$(input_key "$name")
  ref=$(image_ref "$name" "$key")
  dir=$IMAGES/$name-$key
  log=$BUILD_LOGS/image-$name.log
  step "$name ($ref)"
  if [[ -s $dir/image.oci.tar && -s $dir/digest ]]; then
    ok "cached: $dir"
  else
    start=$SECONDS
    info "typical: $(typical_time "$name"); log: $log"
    : >"$log"
    tmp=$(mktemp -d "$IMAGES/.$name-$key.XXXXXX")
    chmod 0755 "$tmp"
    mkdir "$tmp/context"
    run_logged "$log" "$(typical_time "$name")" "build_${name//-/_}" "$tmp/context"
    local bin
    for bin in "$tmp"/context/*; do
      is_static "$bin" || die "$bin is not static: $(ldd "$bin" 2>&1 | head -3)"
    done
    cp "$EPHEMERA_ROOT/e2e/images/$name/Dockerfile" "$tmp/context/"
    # --timestamp 0: the creation time and file times are fixed, so the same
    # inputs give the same digest.
    run_logged "$log" "a few seconds" bah bud --network none --pull-never --timestamp 0 --identity-label=false \
      --tag "$ref" "$tmp/context"
    run_logged "$log" "a few seconds" bah push --quiet --digestfile "$tmp/digest" "$ref" "oci-archive:$tmp/image.oci.tar:$ref"
    bah rmi "$ref" >>"$log" 2>&1 || true
    echo "$ref" >"$tmp/ref"
    rm -rf "$tmp/context"
    # Another run may have finished the same key meanwhile: keep that one.
    mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
    ok "built in $(fmt_duration $((SECONDS - start))): $(du -h "$dir/image.oci.tar" | cut -f1), $(cat "$dir/digest")"
  fi
  ln -sfn "$name-$key/image.oci.tar" "$IMAGES/$name.oci.tar"
  # Written whole, then renamed: a reader never sees half a reference.
  echo "$ref" >"$IMAGES/.$name.ref.$$"
  mv -f "$IMAGES/.$name.ref.$$" "$IMAGES/$name.ref"
  info "archive: $dir/image.oci.tar"
}

cmd_test_images() {
  local names=("$@") name
  ((${#names[@]})) || names=("${TEST_IMAGES[@]}")
  for name in "${names[@]}"; do
    known_image "$name"
  done
  need_buildah
  for name in "${names[@]}"; do
    case $name in
      pause) need_gcc_static ;;
      sdk-probe) need_go ;;
    esac
    build_test_image "$name"
  done
  step "archives (ctr -n k8s.io images import ARCHIVE)"
  for name in "${names[@]}"; do
    printf '%s\t%s\n' "$(cat "$IMAGES/$name.ref")" "$(readlink -f "$IMAGES/$name.oci.tar")"
  done
}

# built_dir NAME: the cache directory for NAME's current inputs, or die.
built_dir() {
  known_image "$1"
  local dir
  dir=$IMAGES/$1-$(input_key "$1")
  [[ -s $dir/image.oci.tar ]] || die "$1 is not built for the current inputs: e2e/scripts/images.sh $1"
  echo "$dir"
}

# === the operator image (make image) ===

cmd_operator() {
  local cargo=${CARGO:-cargo} version revision created start=$SECONDS
  local out=$EPHEMERA_ROOT/target/image
  local bin=$EPHEMERA_ROOT/target/x86_64-unknown-linux-gnu/release/ephemera
  local log=$BUILD_LOGS/image-ephemera.log
  version=$(awk '/^\[/ {pkg = ($0 == "[package]")} pkg && /^version *=/ {gsub(/^version *= *"|".*$/, ""); print; exit}' \
    "$EPHEMERA_ROOT/Cargo.toml")
  [[ -n $version ]] || die "no version in Cargo.toml"
  local ref=ephemera.local/ephemera:$version
  revision=$(git -C "$EPHEMERA_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
  if [[ $revision != unknown && -n $(git -C "$EPHEMERA_ROOT" status --porcelain -- Cargo.toml Cargo.lock src Dockerfile) ]]; then
    revision+=-dirty
  fi
  # The commit's time, not now: the same commit gives the same image.
  created=${SOURCE_DATE_EPOCH:-$(git -C "$EPHEMERA_ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}
  need_buildah
  mkdir -p "$out"
  : >"$log"

  step "[1/3] static release binary (cargo build --release, crt-static, stripped)"
  info "typical: 15 min cold on 2 cores, seconds when nothing changed; log: $log"
  # The same build as stage `build` of the Dockerfile: static glibc (--target
  # keeps crt-static off build scripts and proc-macros), symbols stripped.
  # Its target directory is kept in the cache, outside the clone: a clean
  # clone (CI) then compiles only the crate itself, not its 400 dependencies.
  local target_dir=$CACHE/cargo-target-static
  run_logged "$log" "15 min cold" env -C "$EPHEMERA_ROOT" RUSTFLAGS='-C target-feature=+crt-static' \
    CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_TARGET_DIR="$target_dir" \
    "$cargo" build --release --locked --target x86_64-unknown-linux-gnu
  # Where the Dockerfile's `prebuilt` stage copies it from (the build context).
  install -D -m 0755 "$target_dir/x86_64-unknown-linux-gnu/release/ephemera" "$bin"
  is_static "$bin" || die "$bin is not static: $(ldd "$bin" 2>&1 | head -3)"
  local kind="statically linked"
  if command -v file >/dev/null; then
    kind=$(file -b "$bin" | grep -o 'static-pie linked\|statically linked' || echo "statically linked")
  fi
  ok "$kind, $(du -h "$bin" | cut -f1)"

  step "[2/3] $ref: buildah bud --target prebuilt (Dockerfile; the Rust stage is skipped)"
  info "typical: 5-10 s; log: $log"
  # --squash: one layer, the binary (stage runtime would add an empty one).
  run_logged "$log" "5-10 s" bah bud --network none --pull-never --timestamp "$created" --identity-label=false \
    --squash --target prebuilt --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --tag "$ref" --file "$EPHEMERA_ROOT/Dockerfile" "$EPHEMERA_ROOT"
  ok "built"

  step "[3/3] OCI archive and digest"
  local archive=$out/ephemera-$version.oci.tar digestfile=$out/ephemera-$version.digest
  rm -f "$archive"
  run_logged "$log" "5-10 s" bah push --quiet --digestfile "$digestfile" "$ref" "oci-archive:$archive:$ref"
  bah rmi "$ref" >>"$log" 2>&1 || true
  bah rmi --prune >>"$log" 2>&1 || true
  # The image unpacks to the binary alone; the archive holds it compressed.
  local packed unpacked
  packed=$(stat -c %s "$archive") unpacked=$(stat -c %s "$bin")
  ok "$archive: $(numfmt --to=iec-i --suffix=B "$packed") compressed, $(numfmt --to=iec-i --suffix=B "$unpacked") unpacked"
  ok "$digestfile: $(cat "$digestfile")"
  if ((unpacked > 40 * 1024 * 1024)); then
    info "warning: the image is over its 40 MiB budget"
  fi
  step "image $ref built in $(fmt_duration $((SECONDS - start)))"
  info "push it with: skopeo copy oci-archive:$archive docker://REGISTRY/ephemera:$version (keeps the digest)"
}

case ${1:-} in
  ephemera) cmd_operator ;;
  ref) cat "$(built_dir "${2:?usage: images.sh ref NAME}")/ref" ;;
  archive) echo "$(built_dir "${2:?usage: images.sh archive NAME}")/image.oci.tar" ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) cmd_test_images "$@" ;;
esac
