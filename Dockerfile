# The ephemera image: one static binary in an empty image, run as non-root.
#
#   docker build -t REGISTRY/ephemera:0.1.0 .          (or podman/buildah: the same)
#   make image                                         (offline, with buildah: see below)
#
# Two ways to the same final image, sharing its definition (stage `runtime`):
#   - the default, last stage compiles the binary in stage `build`;
#   - `--target prebuilt` copies the binary `cargo build` already made on the
#     host (target/x86_64-unknown-linux-gnu/release/ephemera, built with the
#     same command as stage `build`). `make image` builds this target with
#     `buildah bud --network none --pull-never`, on a machine that can pull
#     nothing; buildah skips stages the target does not use, so `build` is
#     neither pulled nor run.
# Why stage targets and not `ARG BINARY_FROM=build` + `FROM ${BINARY_FROM}`:
# buildah 1.28 (Debian bookworm; podman 4.3 uses it) decides which stages to
# skip without the ARG's default, skips `build` and then fails with
# "build: image not known", so `podman build .` would break unless given
# --build-arg BINARY_FROM=build. A target works the same with every engine.

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm

# === build ===
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Only what the build reads (benches/ and tests/: Cargo.toml declares targets there).
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY tests tests
# Static glibc (static-pie): the image needs no libc. The target triple must be
# explicit, or crt-static would also apply to proc-macros and build scripts.
# Without its symbol table the binary is 28 MiB instead of 40 (panics still
# name their file and line; backtraces lose function names).
RUN RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --target x86_64-unknown-linux-gnu \
 && install -D target/x86_64-unknown-linux-gnu/release/ephemera /out/ephemera

# === runtime: everything but the binary ===
FROM scratch AS runtime
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ephemera" \
      org.opencontainers.image.description="Per-workload, short-lived cloud and Kubernetes identities that die with the workload" \
      org.opencontainers.image.source="https://github.com/ephemera-dev/ephemera" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# The chart's podSecurityContext runs as 65532 too (runAsNonRoot needs a numeric user).
USER 65532:65532
ENTRYPOINT ["/ephemera"]

# === prebuilt: the binary from the host (`make image`) ===
FROM runtime AS prebuilt
COPY target/x86_64-unknown-linux-gnu/release/ephemera /ephemera

# === default: the binary from stage `build` ===
FROM runtime
COPY --from=build /out/ephemera /ephemera
