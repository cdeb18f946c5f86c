#!/usr/bin/env bash
# Runs one cargo-fuzz target for a bounded time. cargo-fuzz needs nightly
# Rust; it is installed once into the cache, outside the repo.
#   e2e/scripts/fuzz.sh <target> <seconds>
set -euo pipefail
source "$(dirname "$0")/lib.sh"
target=${1:?usage: fuzz.sh <target> <seconds>}
seconds=${2:-60}
root=$CACHE/cargo-fuzz
if ! [ -x "$root/bin/cargo-fuzz" ]; then
  step "installing cargo-fuzz into $root (once; about 2 min); log: $CACHE/logs/cargo-fuzz.log"
  mkdir -p "$CACHE/logs"
  cargo install cargo-fuzz --locked --root "$root" >"$CACHE/logs/cargo-fuzz.log" 2>&1 \
    || die "cargo-fuzz did not install; see $CACHE/logs/cargo-fuzz.log"
fi
cargo +nightly --version >/dev/null 2>&1 || die "the nightly toolchain is missing (rustup toolchain install nightly)"
cd "$EPHEMERA_ROOT/fuzz"
mkdir -p "corpus/$target"
mkdir -p "seeds/$target"
# The instrumented build lives in the cache, so a clean clone (CI) rebuilds
# only what changed: the first build takes about 10 min on 2 cores, later ones 1-2 min.
target_dir=$CACHE/fuzz-target
step "fuzzing $target for ${seconds}s (build log: $CACHE/logs/fuzz-build-$target.log; first build ~10 min); crashes land in fuzz/artifacts/$target"
PATH="$root/bin:$PATH" cargo +nightly fuzz build --target-dir "$target_dir" "$target" >"$CACHE/logs/fuzz-build-$target.log" 2>&1 \
  || die "the fuzz build failed; see $CACHE/logs/fuzz-build-$target.log"
# -timeout: an input slower than 10 s is a finding (a matcher gone exponential).
PATH="$root/bin:$PATH" cargo +nightly fuzz run --target-dir "$target_dir" "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$seconds" -timeout=10
ok "no crash in ${seconds}s of $target"
