//! Ephemera gives every Kubernetes workload its own short-lived, narrowly
//! scoped identity and destroys it the moment the workload ends.
//!
//! The binary (`src/main.rs`) only parses flags; everything lives here:
//! - [`api`]: the `ephemera.dev` custom resources and well-known names,
//! - [`webhook`]: admission (pod mutation, CR validation),
//! - [`controller`]: provisioning and reaping,
//! - [`cloud`]: cloud identity providers (AWS IAM/STS),
//! - [`inventory`]: the live identities, for people and scripts,
//! - [`uninstall`]: reaping every identity before the operator goes,
//! - [`telemetry`]: logging and metrics.

pub mod api;
pub mod cloud;
pub mod controller;
pub mod crdgen;
pub mod error;
pub mod inventory;
pub mod policy;
pub mod telemetry;
pub mod uninstall;
pub mod webhook;

pub use error::{Error, Result};

#[cfg(test)]
mod test_support;

/// Version of this build, as reported by `ephemera version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Kubernetes minor release the API types are compiled against
/// (the `k8s-openapi` feature in `Cargo.toml`), and the one the e2e
/// control plane runs.
pub const KUBERNETES_API: &str = "1.36";

/// Resolves on SIGTERM (what the kubelet sends) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}
