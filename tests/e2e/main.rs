//! End-to-end tests against the local test bed: a real kube-apiserver with
//! controller-manager, scheduler and kwok nodes, and MiniStack for IAM/STS.
//!
//! Run with `make e2e` (it starts the test bed and sources `.ephemera/dev.env`).
//! Each test makes its own namespace and removes it when done.

mod bench;
mod chart_rbac;
mod crds;
mod faults;
mod identity;
mod leadership;
mod lifecycle;
mod real_node;
mod reaping;
mod rotation;
mod soak;
mod support;
mod tenant;
mod testbed;
mod webhook;
