# Ephemera: `make help` lists the targets. The two that matter to a newcomer:
#   make demo   bring up the local test bed and walk through it
#   make test   everything CI runs: format, lint, unit and end-to-end tests

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
DEV_ENV := .ephemera/dev.env
# The crate's version: the image's tag and the chart's appVersion.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -1)

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
	  /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

.PHONY: build
build: ## Build the ephemera binary (debug).
	$(CARGO) build

.PHONY: fmt
fmt: ## Format the Rust code.
	$(CARGO) fmt

.PHONY: lint
lint: ## Check formatting and run clippy with warnings as errors.
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features e2e -- -D warnings

.PHONY: crds
crds: ## Regenerate crds/*.yaml from the Rust types (a unit test fails when they drift), then the chart's copies and manifests/.
	$(CARGO) run --quiet -- crdgen --output-dir crds
	e2e/scripts/chart.sh render

.PHONY: manifests
manifests: ## Render manifests/ (GitOps) and the operator's IAM policy from charts/ephemera (chart-check fails when they drift).
	e2e/scripts/chart.sh render

.PHONY: unit
unit: ## Run the unit tests (no cluster needed).
	$(CARGO) test

##@ Images (built offline with buildah: FROM scratch, nothing pulled)

.PHONY: image
image: ## The operator image from ./Dockerfile: static release binary, then target/image/ephemera-<version>.oci.tar and .digest.
	CARGO="$(CARGO)" e2e/scripts/images.sh ephemera

.PHONY: test-images
test-images: ## The test bed's images (pause, sdk-probe): OCI archives in ~/.cache/ephemera/images, cached by their inputs.
	e2e/scripts/images.sh

##@ Test bed (local Kubernetes, a kwok node, a real node and MiniStack, on loopback and the node's bridge)

.PHONY: tools
tools: ## Build the control plane (with kubelet, kube-proxy), etcd, kwok, helm, crictl, kube-router and the MiniStack venv (cached in ~/.cache/ephemera).
	e2e/scripts/tools.sh

.PHONY: cluster-up
cluster-up: ## Start the test bed (idempotent): control plane, kwok and real node, MiniStack; writes .ephemera/dev.env, logs in .ephemera/logs/.
	e2e/scripts/cluster.sh up

.PHONY: cluster-down
cluster-down: ## Stop every test bed process, wipe its data and give the host back as it was (rules, mounts, cgroups, bridge, sysctls).
	e2e/scripts/cluster.sh down

.PHONY: node-image
node-image: cluster-up image ## Import the operator image into the real node (pods use it with imagePullPolicy Never).
	e2e/scripts/cluster.sh import target/image/ephemera-$(VERSION).oci.tar

.PHONY: cluster-status
cluster-status: ## Show which test bed processes run.
	e2e/scripts/cluster.sh status

##@ Testing

.PHONY: test
test: lint unit host-check e2e chart-check fuzz-smoke ## Everything CI runs: fmt, clippy, unit tests, the real node's host check, e2e tests, the Helm chart checks, 30 s of each fuzz target.

.PHONY: e2e
e2e: node-image ## End-to-end tests against the test bed (starts it if needed and imports the operator image; leaves it running).
	source $(DEV_ENV) && $(CARGO) test --features e2e --test e2e -- --test-threads 2

.PHONY: host-check
host-check: ## cluster-up / cluster-down 3 times with a pod on the real node; fails unless the host is as before (stops a running test bed first).
	e2e/scripts/host-check.sh 3

.PHONY: chart-check
chart-check: cluster-up ## Helm chart: lint, schema, dry runs, drift, install/upgrade/uninstall, RBAC can-i, GitOps idempotence.
	e2e/scripts/chart.sh check

.PHONY: soak
SOAK_LIFECYCLES ?= 1000
FAULT_LIFECYCLES ?= 500
soak: node-image ## SOAK_LIFECYCLES lifecycles under random SIGKILLs of the controller, FAULT_LIFECYCLES under 20 % IAM/STS faults, apiserver restarts, a pod on the real node outliving its 10-minute token; fails on any orphan.
	source $(DEV_ENV) && EPHEMERA_SOAK_LIFECYCLES=$(SOAK_LIFECYCLES) EPHEMERA_SOAK_CONCURRENCY=8 \
	  EPHEMERA_FAULT_LIFECYCLES=$(FAULT_LIFECYCLES) \
	  $(CARGO) test --features e2e --test e2e -- soak:: faults:: token_refresh --include-ignored --nocapture --test-threads 1

##@ Performance

.PHONY: bench
BENCH_LEASES ?= 100
BENCH_NODE_LEASES ?= 500
bench: node-image ## Benchmarks, printed not asserted: mutate() (criterion), the webhook beside amazon-eks-pod-identity-webhook (HTTPS load, CPU per request), BENCH_LEASES pod lifecycles on the test bed, then bench-node.
	$(CARGO) bench --bench mutate -- --noplot
	CARGO="$(CARGO)" e2e/scripts/bench-webhook.sh
	source $(DEV_ENV) && EPHEMERA_BENCH_LEASES=$(BENCH_LEASES) $(CARGO) test --release --features e2e --test e2e bench:: -- --ignored --nocapture
	BENCH_LEASES=$(BENCH_NODE_LEASES) e2e/scripts/bench-node.sh

.PHONY: bench-node
bench-node: node-image ## The operator as pods on the real node: idle RSS, a BENCH_NODE_LEASES (500) burst (all Ready, all reaped, peak RSS), webhook latency through its Service (wrk).
	BENCH_LEASES=$(BENCH_NODE_LEASES) e2e/scripts/bench-node.sh

.PHONY: fuzz
FUZZ_SECONDS ?= 300
fuzz: ## Fuzz AdmissionReview decode + mutate and the boundary matcher, FUZZ_SECONDS each (nightly toolchain; cargo-fuzz installed into ~/.cache/ephemera).
	e2e/scripts/fuzz.sh admission_review $(FUZZ_SECONDS)
	e2e/scripts/fuzz.sh policy_clamp $(FUZZ_SECONDS)

.PHONY: fuzz-smoke
fuzz-smoke: ## What CI runs: each fuzz target for 30 s.
	$(MAKE) fuzz FUZZ_SECONDS=30

##@ Demo

.PHONY: demo
demo: node-image ## Bring up the test bed, install ephemera with Helm from its image onto the real node, and run a workload through its life.
	e2e/scripts/demo.sh
